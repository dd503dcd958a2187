"""`make run`'s program: starts the stack, prints a working example, serves chat (streamed and not)
through the openai SDK, and Ctrl-C stops everything it started."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tools.stack import Ports

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _read_banner(proc: subprocess.Popen[str], deadline: float) -> str:
    lines: list[str] = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return "".join(lines)
    raise AssertionError("no ready banner:\n" + "".join(lines))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_run_local_serves_chat_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    ports = Ports.free()
    cmd = [sys.executable, "-m", "tools.run_local", "--port", str(ports.host), "--simulator-port",
           str(ports.simulator), "--issuer-port", str(ports.issuer), "--azurite-port", str(ports.azurite),
           "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = _read_banner(proc, time.monotonic() + 120)
        base = re.search(r'base_url="([^"]+)"', banner)
        key = re.search(r'api_key="([^"]+)"', banner)
        assert base and key, banner
        client = openai.OpenAI(base_url=base.group(1), api_key=key.group(1), max_retries=0, timeout=30)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content and reply.usage and reply.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                     messages=[{"role": "user", "content": "Hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == 0
    assert not any(_listening(p) for p in (ports.host, ports.simulator, ports.issuer, ports.azurite))

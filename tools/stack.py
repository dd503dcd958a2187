"""The local stack as processes: Azurite, provider simulator, dev token issuer, gateway host.

Used by ``make run`` (fixed ports, data kept under .local/) and by the integration
tests (free ports, throw-away data), so both exercise the same wiring. Every wait is
bounded and every process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.azurite import connection_string as azurite_connection_string
from tools.azurite import free_ports

ROOT = Path(__file__).resolve().parent.parent
DEV_TENANT = "00000000-0000-4000-8000-000000000de0"
DEV_AUDIENCE = "api://ai-gateway-local"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}")
        if listening(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session``: its whole group, SIGTERM then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class Ports:
    host: int = 7071
    simulator: int = 7072
    issuer: int = 7073
    azurite: int = 10002

    @classmethod
    def free(cls) -> Ports:
        return cls(*free_ports(4))


@dataclass
class Stack:
    ports: Ports = field(default_factory=Ports)
    data_dir: Path | None = None  # None: a temporary directory removed on stop
    log_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    storage_mode: str = "table"  # "memory" skips Azurite (benchmarks of the in-memory store)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.host}/api"

    def gateway_env(self) -> dict[str, str]:
        """App settings for the gateway host: local.settings.example.json pointed at this stack."""
        values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
        values.update({
            "AUTH_JWKS_URL": f"http://127.0.0.1:{self.ports.issuer}/keys",
            "AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{self.ports.simulator}",
            "BEDROCK_ENDPOINT_URL": f"http://127.0.0.1:{self.ports.simulator}",
            "GATEWAY_STORAGE_MODE": self.storage_mode,
            "GATEWAY_STORAGE_CONNECTION_STRING": azurite_connection_string(self.ports.azurite),
            # AWS SDK credentials for the simulator only: it accepts any SigV4 signature.
            "AWS_ACCESS_KEY_ID": "local-simulator", "AWS_SECRET_ACCESS_KEY": "local-simulator-secret",
        })
        values.update(self.extra_env)
        return values

    def start(self) -> Stack:
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gw-stack-")
            self.data_dir = Path(self._tmp.name)
        self.log_dir = self.log_dir or self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.storage_mode == "table":
                self._spawn("azurite", ["-m", "tools.azurite", "--port", str(self.ports.azurite),
                                        "--location", str(self.data_dir / "azurite")], self.ports.azurite, 60)
            self._spawn("simulator", ["-m", "tools.provider_simulator", "--port", str(self.ports.simulator)],
                        self.ports.simulator)
            self._spawn("issuer", ["-m", "tools.dev_issuer", "serve", "--port", str(self.ports.issuer),
                                   "--key-dir", str(self.data_dir / "dev-issuer")], self.ports.issuer)
            self._spawn("host", ["-m", "tools.local_host", "--port", str(self.ports.host),
                                 "--settings", str(self.data_dir / "no-local-settings.json")],
                        self.ports.host, env=self.gateway_env())
        except Exception:
            self.stop()
            raise
        return self

    def token(self, caller: str = "alice", roles: str = "Gateway.Standard", *extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "tools.dev_issuer", "token", "--caller", caller, "--roles", roles,
             "--key-dir", str(self.data_dir / "dev-issuer"), *extra],
            cwd=ROOT, check=True, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_group(proc)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop_process(name)
        if self._tmp is not None:
            if keep := os.environ.get("STACK_KEEP_LOGS"):  # a failure's host logs, kept for reading afterwards
                shutil.copytree(self.log_dir, Path(keep) / Path(self._tmp.name).name, dirs_exist_ok=True)
            self._tmp.cleanup()
            self._tmp = None

    def _spawn(self, name: str, args: list[str], port: int, timeout: float = 30,
               env: Mapping[str, str] | None = None) -> None:
        assert self.log_dir is not None
        if listening(port):  # else the readiness probe below would take whoever holds it for this process
            raise RuntimeError(f"{name}: port {port} is already in use")
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        try:
            wait_for_port(port, timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name}: {exc}\n--- {name}.log (tail) ---\n{tail}") from None

    def restart(self, name: str) -> None:
        """Start again a process stopped with ``stop_process`` (fault tests)."""
        if name == "azurite":
            assert self.data_dir is not None
            self._spawn("azurite", ["-m", "tools.azurite", "--port", str(self.ports.azurite),
                                    "--location", str(self.data_dir / "azurite")], self.ports.azurite, 60)
        else:
            raise ValueError(f"restart of {name} is not supported")

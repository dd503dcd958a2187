"""What our gateway needs around it during a benchmark: dev issuer, Azurite, a token, one settings file per store.

The gateway itself is started by the peer harness (it pins it, times its cold start and
stops it), so here it is only a command line: ``env -C ROOT AZURE_OPENAI_ENDPOINT={upstream}
python -m tools.local_host ...``. ``env`` execs python, so the harness sees one process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gateway_lib.config.settings import SETTING_NAMES
from tools.azurite import free_ports
from tools.stack import ROOT, azurite_connection_string, wait_for_port

BENCH_ROLE = "Gateway.Bench"
BIG = 10**12  # far above anything a 15-minute run can reach: the quota code runs, it never refuses
# One tier that admits everything; the full pipeline still runs (auth, guardrails with the tiktoken
# estimate, reserve/settle with a ledger row per request).
BENCH_TIERS = {
    "role_tiers": {BENCH_ROLE: "bench"},
    "tier_order": ["bench"],
    "tiers": {"bench": {
        "models": ["*"], "max_tokens_per_request": 16384, "max_tokens_policy": "clamp",
        "requests_per_minute": BIG, "tokens_per_minute": BIG, "tokens_per_day": BIG, "tokens_per_month": BIG,
        "usd_per_day": str(BIG), "usd_per_month": str(BIG), "fail_open": False,
    }},
}


@dataclass
class Services:
    """Dev issuer (+ Azurite when a table store is benchmarked), pinned off the gateway's core."""

    workdir: Path
    stores: tuple[str, ...]
    cpus: str | None  # the load generator's core: neither serves the hot path except Azurite (remote in Azure)
    issuer_port: int = 0  # 0: picked free, distinct from the other
    azurite_port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        picked = iter(free_ports(2))
        self.issuer_port = self.issuer_port or next(picked)
        self.azurite_port = self.azurite_port or next(picked)

    def start(self) -> Services:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn("issuer", ["-m", "tools.dev_issuer", "serve", "--port", str(self.issuer_port),
                               "--key-dir", str(self.workdir / "dev-issuer")], self.issuer_port)
        if any(store.startswith("table") for store in self.stores):
            # In memory: its periodic database saves stalled commits for hundreds of ms (docs/benchmarks.md).
            self._spawn("azurite", ["-m", "tools.azurite", "--port", str(self.azurite_port),
                                    "--location", str(self.workdir / "azurite"), "--in-memory"], self.azurite_port)
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)  # own session (start_new_session): stops azurite's node child too
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        self.procs.clear()

    def token(self, caller: str = "bench") -> str:
        out = subprocess.run(
            [sys.executable, "-m", "tools.dev_issuer", "token", "--caller", caller, "--roles", BENCH_ROLE,
             "--ttl", "7200", "--key-dir", str(self.workdir / "dev-issuer")],
            cwd=ROOT, check=True, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def settings_file(self, store: str, prefix: str) -> Path:
        """local.settings.example.json pointed at the bench services; the endpoint comes from the harness.
        ``store`` is memory or table (strict quota), or either with ``-leased`` (GATEWAY_QUOTA_MODE=leased)."""
        doc = json.loads((ROOT / "local.settings.example.json").read_text())
        doc["Values"].update({
            "AUTH_JWKS_URL": f"http://127.0.0.1:{self.issuer_port}/keys",
            "GATEWAY_TIERS": json.dumps(BENCH_TIERS),
            "GATEWAY_STORAGE_MODE": store.split("-")[0],
            "GATEWAY_QUOTA_MODE": "leased" if store.endswith("-leased") else "strict",
            "GATEWAY_STORAGE_CONNECTION_STRING": azurite_connection_string(self.azurite_port),
            "GATEWAY_TABLE_PREFIX": prefix,  # fresh tables per run: counters and ledger start empty
            "AZURE_OPENAI_AUTH": "api_key",
        })
        path = self.workdir / f"settings-{store}.json"
        path.write_text(json.dumps(doc, indent=1))
        return path

    def _spawn(self, name: str, args: list[str], port: int) -> None:
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([*pin, sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=clean_env(), start_new_session=True)
        self.procs.append(proc)
        wait_for_port(port, 60, proc)


def start_command(settings: Path, port: int) -> str:
    """The gateway as the harness starts it; ``{upstream}`` is the harness's fake upstream base URL."""
    python = ROOT / ".venv" / "bin" / "python"
    return shlex.join(["env", "-C", str(ROOT), "AZURE_OPENAI_ENDPOINT={upstream}", "PYTHONUNBUFFERED=1",
                       str(python if python.exists() else sys.executable), "-m", "tools.local_host",
                       "--port", str(port), "--settings", str(settings)])


def clean_env() -> dict[str, str]:
    """This environment minus gateway settings: local_host lets the real environment win over the file."""
    return {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}

"""The local stack with the gateway served by the real Functions worker (tools/worker_host.py) instead of the
local host: same Azurite, simulator and dev issuer, same app settings (local.settings.example.json's Values
pointed at the stack)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.azurite import free_port
from tools.stack import ROOT, Stack


@dataclass
class WorkerStack(Stack):
    worker_dir: Path = field(default=Path())
    master_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    function_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    hosts: dict[str, int] = field(default_factory=dict)  # host name -> port

    def _spawn(self, name: str, args: list[str], port: int, timeout: float = 30,
               env: Mapping[str, str] | None = None) -> None:
        if name != "host":
            super()._spawn(name, args, port, timeout, env)
            return
        self.add_host("host", port, env or {})

    def add_host(self, name: str, port: int | None = None, env: Mapping[str, str] | None = None,
                 without: tuple[str, ...] = ()) -> str:
        """Start one more worker host on this stack's services (``without``: app settings it does not get)."""
        port = port or free_port()
        settings = ROOT / "local.settings.example.json"
        if without:
            assert self.data_dir is not None
            values = json.loads(settings.read_text())
            values["Values"] = {k: v for k, v in values["Values"].items() if k not in without}
            settings = self.data_dir / f"{name}.settings.json"
            settings.write_text(json.dumps(values))
        args = ["-m", "tools.worker_host", "--worker", str(self.worker_dir), "--port", str(port), "--settings", str(settings),
                "--master-key", self.master_key, "--function-key", self.function_key]
        # The host speaks gRPC with the worker's own grpcio/protobuf, so its folder leads PYTHONPATH.
        merged = {k: v for k, v in {**self.gateway_env(), **(env or {})}.items() if k not in without}
        merged["PYTHONPATH"] = os.pathsep.join([str(self.worker_dir), str(ROOT)])
        super()._spawn(name, args, port, 180, merged)
        self.hosts[name] = port
        return f"http://127.0.0.1:{port}"

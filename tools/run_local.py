"""``make run``: the whole local stack on fixed ports, until Ctrl-C.

Azurite (Table Storage, data in .local/azurite), the provider simulator on :7072,
the dev token issuer on :7073 and the gateway host on 127.0.0.1:7071, configured
from local.settings.example.json (plus local.settings.json overrides, if present).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from tools.stack import ROOT, Ports, Stack


def _overrides() -> dict[str, str]:
    path = ROOT / "local.settings.json"
    if not path.exists():
        return {}
    return {k: str(v) for k, v in json.loads(path.read_text()).get("Values", {}).items()}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the local stack until Ctrl-C.")
    defaults = Ports()
    parser.add_argument("--port", type=int, default=defaults.host, help="gateway host port (like func start)")
    parser.add_argument("--simulator-port", type=int, default=defaults.simulator)
    parser.add_argument("--issuer-port", type=int, default=defaults.issuer)
    parser.add_argument("--azurite-port", type=int, default=defaults.azurite)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".local", help="Azurite data, dev key, logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    data = args.data_dir
    ports = Ports(host=args.port, simulator=args.simulator_port, issuer=args.issuer_port, azurite=args.azurite_port)
    stack = Stack(ports=ports, data_dir=data, log_dir=data / "logs", extra_env=_overrides())
    print("starting Azurite, provider simulator, dev token issuer and the gateway ...", flush=True)
    stack.start()
    token = stack.token("alice", "Gateway.Standard")
    base = stack.base_url
    print(f"""
AI gateway running at {base}   (logs: {data / 'logs'})

  curl -s {base}/health
  curl -s {base}/v1/chat/completions \\
    -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{token}")
print(client.chat.completions.create(model="gpt-4o-mini",
      messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)
for chunk in client.chat.completions.create(model="claude-3-haiku", stream=True,
      messages=[{{"role": "user", "content": "Hello"}}]):
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="")
PY

More tokens: make token CALLER=bob ROLES=Gateway.Premium     Ctrl-C stops everything.
""", flush=True)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; see {data / 'logs' / (name + '.log')}", flush=True)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Put on the worker's PYTHONPATH by tools/worker_host.py: the app under the real worker is held to loopback
like every other test process (tools/netguard.py, loaded by path so the app folder stays off sys.path)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_loopback_guard", Path(__file__).resolve().parents[1] / "netguard.py")
assert _spec is not None and _spec.loader is not None
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
_guard.install()

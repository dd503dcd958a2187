"""Lay out the real Azure Functions Python worker under .local/ the way Core Tools ships it.

The worker source (upstream 4.34.0, MIT) is not on any registry for Python 3.11; it is looked up as
``$FUNCTIONS_WORKER_DIR``, then ``<repo>/../shared/functions-worker``, then ``/work/shared/functions-worker``.
Its pinned packages go into the worker's own folder (``pip install --target``), never the app's venv, and its
protobuf modules are generated here with grpcio-tools, as the upstream build does. The folder name
``python/<X.Y>/<OS>/<ARCH>`` is the one the worker recognises as its own dependency path.

    python -m tools.worker_setup          # idempotent; without a source it says why and exits 0
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".local" / "functions-worker"
WORKER_PINS = ("grpcio~=1.59.0", "protobuf~=4.25.3", "python-dateutil~=2.9.0", "azurefunctions-extensions-base")
BUILD_PINS = ("grpcio-tools~=1.59.0",)  # the generator matching the worker's protobuf 4.25 runtime
PROTO_SUBDIR = Path("azure_functions_worker/protos/_src/src/proto")
PROTOS = ("FunctionRpc.proto", "identity/ClaimsIdentityRpc.proto", "shared/NullableTypes.proto")


@dataclass(frozen=True)
class Worker:
    directory: Path  # holds worker.py, azure_functions_worker/ and the worker's packages

    @property
    def script(self) -> Path:
        return self.directory / "worker.py"


def candidates() -> list[Path]:
    found = [Path(os.environ["FUNCTIONS_WORKER_DIR"])] if os.environ.get("FUNCTIONS_WORKER_DIR") else []
    return [*found, ROOT.parent / "shared" / "functions-worker", Path("/work/shared/functions-worker")]


def find_source() -> tuple[Path | None, str]:
    """The worker source, or None and why not (a user's clone has no shared/ folder beside it)."""
    looked = candidates()
    for path in looked:
        if (path / "azure_functions_worker").is_dir() and (path / "python" / "prodV4" / "worker.py").is_file():
            missing = [p for p in PROTOS if not (path / PROTO_SUBDIR / p).is_file()]
            if missing:
                return None, f"{path} has no .proto files under {PROTO_SUBDIR} ({', '.join(missing)})"
            return path, ""
    return None, "no Azure Functions Python worker source in " + ", ".join(str(p) for p in looked)


def worker_dir(home: Path = HOME) -> Path:
    system = {"Linux": "LINUX", "Darwin": "OSX", "Windows": "WINDOWS"}.get(platform.system(), "LINUX")
    arch = "Arm64" if platform.machine().lower() in ("arm64", "aarch64") else "X64"
    return home / "python" / f"{sys.version_info.major}.{sys.version_info.minor}" / system / arch


def _fingerprint(source: Path) -> str:
    digest = hashlib.sha256(json.dumps([WORKER_PINS, BUILD_PINS, sys.version]).encode())
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(source)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _pip(target: Path, *pins: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--target", str(target), *pins], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:  # pip also warns about the venv's own packages; only a failure is worth showing
        raise RuntimeError(f"pip install --target {target} {' '.join(pins)} failed:\n{out.stdout}\n{out.stderr}")


def _generate_protos(source: Path, build: Path, out_dir: Path) -> None:
    include = source / PROTO_SUBDIR
    env = {**os.environ, "PYTHONPATH": str(build)}
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTOS]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"protoc failed:\n{out.stdout}\n{out.stderr}")
    for generated in out_dir.rglob("*_pb2*.py"):
        generated.write_text(absolute_imports(generated.read_text()))


def absolute_imports(code: str) -> str:
    """protoc writes imports relative to the include root; the worker imports them as its own package."""
    code = re.sub(r"^from (identity|shared) import (\w+_pb2)", r"from azure_functions_worker.protos.\1 import \2",
                  code, flags=re.M)
    return re.sub(r"^import (\w+_pb2) as", r"from azure_functions_worker.protos import \1 as", code, flags=re.M)


def install(source: Path, home: Path = HOME) -> Worker:
    """Copy the worker, install its pins beside it, generate its protobuf modules (skipped when up to date)."""
    target = worker_dir(home)
    stamp = home / ".installed"
    fingerprint = _fingerprint(source)
    if stamp.is_file() and stamp.read_text() == fingerprint and (target / "worker.py").is_file():
        return Worker(target)
    shutil.rmtree(home, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(source / "azure_functions_worker", target / "azure_functions_worker",
                    ignore=shutil.ignore_patterns("__pycache__", "_src"))
    for name in ("worker.py", "worker.config.json"):
        shutil.copy2(source / "python" / "prodV4" / name, target / name)
    shutil.copy2(source / "LICENSE", target / "LICENSE")
    for path in target.rglob("*"):  # the shared source is read-only; the copy must be removable
        path.chmod(path.stat().st_mode | 0o200)
    _pip(target, *WORKER_PINS)
    _pip(home / "build", *BUILD_PINS)
    _generate_protos(source, home / "build", target / "azure_functions_worker" / "protos")
    stamp.write_text(fingerprint)
    return Worker(target)


def ensure() -> tuple[Worker | None, str]:
    """The installed worker, or None and the reason it is not available."""
    source, reason = find_source()
    if source is None:
        return None, reason
    return install(source), ""


def main() -> int:
    worker, reason = ensure()
    if worker is None:  # the other tiers still run; the real-worker tier skips, or fails under CI, saying why
        under_ci = bool(os.environ.get("CI"))
        print(f"worker_setup: {reason}; the real-worker test tier will "
              f"{'FAIL (CI is set)' if under_ci else 'be skipped'}", file=sys.stderr)
        return 0
    print(f"worker_setup: Azure Functions Python worker ready in {worker.directory.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

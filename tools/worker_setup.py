"""Lay out the real Azure Functions Python worker under .local/ the way Core Tools ships it.

The worker source (upstream 4.34.0, MIT) is not on any registry for Python 3.11; it is looked up as
``$FUNCTIONS_WORKER_DIR``, then ``<repo>/../shared/functions-worker``, then ``/work/shared/functions-worker``.
Its pinned packages go into the worker's own folder (``pip install --target``), never the app's venv, and its
protobuf modules are generated here with grpcio-tools, as the upstream build does, from the protocol that
tools/worker_protocol.py finds (the source's .proto files, else a pinned PyPI wheel) and checks. The folder name
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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools import worker_protocol, worker_protocol_check
from tools.worker_protocol import PROTOS

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".local" / "functions-worker"
DOWNLOADS = ROOT / ".local" / "downloads"  # outside HOME: a reinstall keeps the verified wheel
WORKER_PINS = ("grpcio~=1.59.0", "protobuf~=4.25.3", "python-dateutil~=2.9.0", "azurefunctions-extensions-base")
BUILD_PINS = ("grpcio-tools~=1.59.0",)  # the generator matching the worker's protobuf 4.25 runtime
PROTO_SUBDIR = Path("azure_functions_worker/protos/_src/src/proto")


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
            return path, ""
    return None, "no Azure Functions Python worker source in " + ", ".join(str(p) for p in looked)


def worker_dir(home: Path = HOME) -> Path:
    system = {"Linux": "LINUX", "Darwin": "OSX", "Windows": "WINDOWS"}.get(platform.system(), "LINUX")
    arch = "Arm64" if platform.machine().lower() in ("arm64", "aarch64") else "X64"
    return home / "python" / f"{sys.version_info.major}.{sys.version_info.minor}" / system / arch


def _fingerprint(source: Path) -> str:
    pins = [WORKER_PINS, BUILD_PINS, worker_protocol.WHEEL_SHA256, sys.version]
    digest = hashlib.sha256(json.dumps(pins).encode())
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


def has_protos(source: Path) -> bool:
    return all((source / PROTO_SUBDIR / p).is_file() for p in PROTOS)


def generate_protos(source: Path, build: Path, out_dir: Path, downloads: Path = DOWNLOADS) -> str:
    """Write the worker's ``_pb2``/``_pb2_grpc`` modules; returns where the protocol came from."""
    with tempfile.TemporaryDirectory() as scratch:
        return _generate_in(source, build, out_dir, downloads, Path(scratch) / "FunctionRpc.binpb")


def _generate_in(source: Path, build: Path, out_dir: Path, downloads: Path, descriptors: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(build)}
    protoc = [sys.executable, "-m", "grpc_tools.protoc"]
    if has_protos(source):
        fds = worker_protocol.from_protos(source / PROTO_SUBDIR, protoc, env, descriptors)
        origin = f"the .proto files in {source / PROTO_SUBDIR}"
    else:
        fds = worker_protocol.from_wheel(worker_protocol.fetch_wheel(downloads))
        descriptors.write_bytes(fds.SerializeToString())
        origin = f"{worker_protocol.WHEEL} (sha256 {worker_protocol.WHEEL_SHA256[:12]}...)"
    problems = worker_protocol_check.problems(fds, source / "azure_functions_worker")
    if problems:
        raise RuntimeError(f"the protocol from {origin} does not fit the worker:\n  " + "\n  ".join(problems))
    args = [*protoc, f"--descriptor_set_in={descriptors}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            *PROTOS]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"protoc failed:\n{out.stdout}\n{out.stderr}")
    for generated in out_dir.rglob("*_pb2*.py"):
        generated.write_text(absolute_imports(generated.read_text()))
    return origin


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
    origin = generate_protos(source, home / "build", target / "azure_functions_worker" / "protos")
    _check_imports(target)
    print(f"worker_setup: protocol generated from {origin}", file=sys.stderr)
    stamp.write_text(fingerprint)
    return Worker(target)


def _check_imports(target: Path) -> None:
    """The worker's own ``protos`` package imports with its own grpcio/protobuf: every name it re-exports exists."""
    code = "import azure_functions_worker.protos as p; print(p.StreamingMessage.DESCRIPTOR.full_name)"
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         cwd=target, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or out.stdout.strip() != "AzureFunctionsRpcMessages.StreamingMessage":
        raise RuntimeError(f"the generated protos do not import in the worker's environment:\n{out.stdout}\n{out.stderr}")


def ensure() -> tuple[Worker | None, str]:
    """The installed worker, or None and the reason it is not available."""
    source, reason = find_source()
    if source is None:
        return None, reason
    try:
        return install(source), ""
    except worker_protocol.ProtocolUnavailable as exc:  # e.g. no registry: locally a skip, under CI a failure
        return None, str(exc)


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

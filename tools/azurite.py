"""Run the Azurite Table service locally (development and integration tests).

``python -m tools.azurite [--port 10002] [--location DIR]`` runs it in the foreground
(data under ``.local/azurite/`` by default, git-ignored). Tests use ``Azurite`` directly:
a free port, a temp directory, and ``stop()`` / ``restart()`` to simulate an outage.
Azurite is a pinned devDependency in ``package.json``; it is installed on first use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "node_modules" / ".bin" / "azurite-table"
DEFAULT_LOCATION = ROOT / ".local" / "azurite"
HOST = "127.0.0.1"
# Azurite's well-known development account key (public, documented by Microsoft; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_TIMEOUT = 30.0


def ensure_installed() -> Path:
    """Install the pinned Azurite from package.json if ``node_modules`` lacks it."""
    if not BINARY.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is required to install Azurite (Node 18+)")
        subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=ROOT, check=True, timeout=600)
    return BINARY


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every probe stays bound until all are picked, or the kernel may hand
    the same port out twice."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};"
            f"TableEndpoint=http://{HOST}:{port}/devstoreaccount1;")


class Azurite:
    """One Azurite Table process: ``start()``, ``stop()``, ``restart()`` (data survives a restart, unless
    ``in_memory``)."""

    def __init__(self, port: int = 10002, location: Path | None = None, in_memory: bool = False) -> None:
        self.port = port
        self.location = location or DEFAULT_LOCATION  # the data, or with ``in_memory`` only the log
        self.in_memory = in_memory  # nothing saved: no pauses to save the database, nothing survives a stop
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Azurite:
        binary = ensure_installed()
        self.location.mkdir(parents=True, exist_ok=True)
        args = [str(binary), "--tableHost", HOST, "--tablePort", str(self.port),
                *(["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.location)]),
                "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]
        with open(self.location / "azurite.log", "ab") as log:
            # Own session: a signal to our process group (a test harness stopping us) must not kill Azurite
            # before it saves its database; we stop it with SIGINT ourselves, and it dies with us if we die.
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.location,
                                             start_new_session=True, preexec_fn=_die_with_parent)
        self._wait_until_listening(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (the signal on which Azurite saves its database and closes), then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def freeze(self) -> None:
        """SIGSTOP: the process stays, its sockets accept and nothing answers (a hung storage node)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: it answers again, the requests queued meanwhile first."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Azurite:
        return self if self.running else self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                log = self.location / "azurite.log"
                raise RuntimeError(f"Azurite exited with {self._process.returncode}; see {log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Azurite did not listen on {HOST}:{self.port} within {timeout:.0f}s")


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL Azurite if the Python process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere: stop() or Ctrl+C is the only cleanup


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # runs main()'s finally, which stops Azurite gracefully


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.azurite", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("AZURITE_TABLE_PORT", "10002")))
    parser.add_argument("--location", type=Path, default=DEFAULT_LOCATION)
    parser.add_argument("--in-memory", action="store_true", help="keep nothing on disk (benchmarks)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = Azurite(args.port, args.location, in_memory=args.in_memory).start()
    kept = "in memory only" if args.in_memory else f"data in {args.location}"
    print(f"Azurite Table on http://{HOST}:{args.port} ({kept}); Ctrl+C to stop")
    print(f"GATEWAY_STORAGE_CONNECTION_STRING={server.connection_string}")
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make bench``: our gateway side by side with LiteLLM, the pass-through floor and the fake upstream.

    python -m bench.run [--quick] [--store memory,memory-leased,table,table-leased]
                        [--skip-litellm] [--no-floor] [--no-relay-floor] [--skip-inprocess] [--cell-by-cell]

1. Makes sure the shared peer harness is set up (``../shared/peer-bench/setup.sh``).
2. Starts the dev issuer (and Azurite for ``table``), writes one settings file per store.
3. Runs the harness: direct, LiteLLM, the pass-through floor, the relay floor (``bench.relay_floor``)
   and ``ours-<store>``, c=1,8,64,
   non-streamed and streamed; the harness starts each gateway pinned to CPU 1 and measures
   cold start, RSS and CPU per request.
4. In-process (``bench.inprocess``): storage round trips per request and a cProfile.
5. Writes ``bench/results/<stamp>/summary.{json,md}`` with the ratios against the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import coldstart, report
from bench.services import ROOT, Services, clean_env, start_command
from tools.azurite import free_port, free_ports
from tools.stack import wait_for_port

# Our gateway's variants and the letter each one's fresh table prefix carries.
STORE_KEYS = {"memory": "m", "memory-leased": "n", "table": "t", "table-leased": "l"}
PASSTHRU_KEY = "sk-bench-1234"  # example_passthrough_gateway.py's default GW_KEY
LITELLM_KEY = "sk-bench-1234"  # the harness's default --litellm-master-key


def peer_bench_dir() -> Path:
    """``../shared/peer-bench`` seen from the repository (or $PEER_BENCH_DIR); checked, not assumed."""
    candidates = [Path(os.environ["PEER_BENCH_DIR"])] if os.environ.get("PEER_BENCH_DIR") else []
    candidates += [parent / "shared" / "peer-bench" for parent in ROOT.resolve().parents]
    for path in candidates:
        if (path / "run_peer_bench.sh").is_file():
            return path.resolve()
    raise SystemExit("peer harness not found: set PEER_BENCH_DIR to the folder holding run_peer_bench.sh")


def bench_root() -> Path:
    return Path(os.environ.get("BENCH_ROOT", "/tmp/bench"))


def ensure_setup(peer: Path, need_litellm: bool) -> None:
    venv_python = bench_root() / "upstream-venv" / "bin" / "python"
    missing = [t for t in ("wrk", "hey", "taskset") if shutil.which(t) is None]
    missing += [] if venv_python.exists() else [str(venv_python)]
    if need_litellm and not (bench_root() / "litellm-venv" / "bin" / "litellm").exists():
        missing.append("litellm venv")
    if missing:
        print(f"peer harness not ready ({', '.join(missing)}): running setup.sh (LiteLLM install takes minutes)",
              flush=True)
        subprocess.run(["bash", str(peer / "setup.sh")], check=True, timeout=1800)


def harness_args(a: argparse.Namespace, peer: Path, services: Services, token: str, prefix: str,
                 cell: Cells) -> list[str]:
    ports = iter(free_ports(2 + len(a.stores)))  # distinct: the harness binds them only as it starts each target
    args = ["--outdir", str(cell.outdir), "--duration", str(a.duration), "--warmup", str(a.warmup),
            "--concurrency", cell.concurrency, "--modes", cell.modes, "--max-total-s", str(cell.max_total_s),
            "--retries", str(a.retries), "--quiet-wait-max", str(a.quiet_wait_max)]
    args += ["--skip-litellm"] if a.skip_litellm else []
    if not a.no_floor:
        port = next(ports)
        python = bench_root() / "upstream-venv" / "bin" / "python"
        args += ["--target", "passthru", f"http://127.0.0.1:{port}/v1/chat/completions",
                 "--header", "passthru", f"Authorization: Bearer {PASSTHRU_KEY}",
                 "--start-cmd", "passthru", f"{python} {peer / 'example_passthrough_gateway.py'} --port {port}"]
    if not a.no_relay_floor:
        port = next(ports)
        cmd = ["env", "-C", str(ROOT), "PYTHONUNBUFFERED=1", sys.executable, "-m", "bench.relay_floor",
               "--port", str(port), "--upstream", "{upstream}"]
        args += ["--target", "relay-floor", f"http://127.0.0.1:{port}/v1/chat/completions",
                 "--start-cmd", "relay-floor", shlex.join(cmd)]
    for store in a.stores:
        name, port = f"ours-{store}", next(ports)
        args += ["--target", name, f"http://127.0.0.1:{port}/api/v1/chat/completions",
                 "--header", name, f"Authorization: Bearer {token}",
                 "--start-cmd", name, start_command(services.settings_file(store, f"{prefix}{STORE_KEYS[store]}"), port),
                 "--overhead-header", name, "x-gateway-overhead-ms"]
    return args


@dataclass(frozen=True)
class Cells:
    """One harness run: its cells (modes x concurrency levels), where it writes, its time cap."""

    modes: str
    concurrency: str
    outdir: Path
    max_total_s: int


def harness_runs(a: argparse.Namespace) -> list[Cells]:
    """One harness run for the whole matrix; with ``--cell-by-cell``, one per mode and concurrency level, each
    with every gateway started afresh on fresh tables (see docs/benchmarks.md)."""
    if not a.cell_by_cell:
        return [Cells(a.modes, a.concurrency, a.outdir / "peer", a.max_total_s)]
    cells = [(m, c) for m in a.modes.split(",") for c in a.concurrency.split(",")]
    cap = max(180, a.max_total_s // len(cells) + 90)  # the cells, their retries and every target's start
    return [Cells(m, c, a.outdir / "peer" / f"{m}-c{c}", cap) for m, c in cells]


def merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The harness results of several runs as one: every row; targets (idle RSS, validation) from the first,
    their peak RSS under load the highest of all runs."""
    first = parts[0]
    targets = [dict(t) for t in first["targets"]]
    for t in targets:
        peaks = [u.get("rss_max_load_kb") or 0 for p in parts for u in p["targets"] if u["name"] == t["name"]]
        t["rss_max_load_kb"] = max(peaks, default=0) or None
    return first | {"targets": targets, "rows": [r for p in parts for r in p["rows"]],
                    "skipped": [s for p in parts for s in p.get("skipped") or []],
                    "runtime_s": sum(p.get("runtime_s") or 0 for p in parts), "harness_runs": len(parts)}


def run_harness(peer: Path, args: list[str], log: Path) -> None:
    shown = [x if not x.startswith("Authorization: Bearer ey") else "Authorization: Bearer <dev token>" for x in args]
    print("harness:", shlex.join([str(peer / "run_peer_bench.sh"), *shown]), flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(peer / "run_peer_bench.sh"), *args], cwd=ROOT, env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # tee: progress on the console, everything in the log
                out.write(line)
                print(line, end="", flush=True)
        finally:
            if proc.poll() is None:  # we are being stopped: the harness stops what it started on SIGTERM
                proc.terminate()
                proc.wait(timeout=60)
        if proc.wait() != 0:
            raise SystemExit(f"peer harness failed ({proc.returncode}); see {log}")


def busy_cores(window_s: float = 2.0) -> float:
    """CPU busy on the whole box over a short window, in cores (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(window_s)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(max_s: float) -> None:
    """Other users share this 2-core box: give their load a bounded chance to pass before starting."""
    deadline = time.monotonic() + max_s
    while (busy := busy_cores()) > 0.3 and time.monotonic() < deadline:
        print(f"box busy ({busy:.2f} cores used by others); waiting up to {deadline - time.monotonic():.0f} s",
              flush=True)
        time.sleep(8)
    if busy > 0.3:
        print(f"WARNING: starting while {busy:.2f} cores are busy; expect '*' (contended) cells", flush=True)


@contextmanager
def fake_upstream(peer: Path) -> Iterator[str]:
    """The harness's fake upstream, pinned to CPU 0 (the load generator's core), for our own measurements;
    yields its base URL."""
    port = free_port()
    python = bench_root() / "upstream-venv" / "bin" / "python"
    upstream = subprocess.Popen(["taskset", "-c", "0", str(python), str(peer / "fake_upstream.py"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, 30, upstream)
        yield f"http://127.0.0.1:{port}"
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


def run_inprocess(a: argparse.Namespace, services: Services, prefix: str) -> dict[str, object]:
    """Round trips + profile per store, gateway pinned to CPU 1, a fake upstream of our own on CPU 0."""
    results: dict[str, object] = {}
    with fake_upstream(peer_bench_dir()) as base:
        for store in a.stores:
            settings = services.settings_file(store, f"{prefix}{STORE_KEYS[store]}p")
            cmd = ["taskset", "-c", "1", sys.executable, "-m", "bench.inprocess", "--settings", str(settings),
                   "--upstream", base, "--key-dir", str(services.workdir / "dev-issuer"),
                   "--requests", str(a.requests), "--profile", str(a.outdir / f"profile-{store}.pstats")]
            print(f"in-process ({store}): {a.requests} requests for CPU, round trips and the profile", flush=True)
            out = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise SystemExit(f"bench.inprocess failed for {store}:\n{out.stderr[-3000:]}")
            results[store] = json.loads(out.stdout)
    return results


def run_coldstarts(a: argparse.Namespace, services: Services, peer: Path, prefix: str) -> dict[str, Any]:
    """LiteLLM's and each of our variants' cold start, ``a.cold_starts`` times (bench.coldstart)."""
    env, token = clean_env(), services.token()

    def round_(base: str, i: int) -> dict[str, coldstart.Target]:
        targets, ports = {}, iter(free_ports(1 + len(a.stores)))
        if not a.skip_litellm:  # started exactly as the harness starts it
            ll_port = next(ports)
            targets["litellm"] = coldstart.Target(
                [str(bench_root() / "litellm-venv" / "bin" / "litellm"), "--config", str(peer / "litellm_config.yaml"),
                 "--host", "127.0.0.1", "--port", str(ll_port), "--num_workers", "1"],
                f"http://127.0.0.1:{ll_port}/v1/chat/completions", {"Authorization": f"Bearer {LITELLM_KEY}"},
                env | {"FAKE_UPSTREAM_BASE": base, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOG": "ERROR",
                       "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"})
        for store in a.stores:
            gw_port = next(ports)
            settings = services.settings_file(store, f"{prefix}{STORE_KEYS[store]}c{i}")  # fresh tables each time
            command = shlex.split(start_command(settings, gw_port).replace("{upstream}", base))
            targets[f"ours-{store}"] = coldstart.Target(command, f"http://127.0.0.1:{gw_port}/api/v1/chat/completions",
                                                         {"Authorization": f"Bearer {token}"}, env)
        return targets

    print(f"cold starts: {a.cold_starts} per gateway, interleaved", flush=True)
    with fake_upstream(peer) as base:
        return coldstart.measure([round_(base, i) for i in range(a.cold_starts)], a.outdir / "coldstarts.log")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short cells, c=1,64, fewer in-process requests (<= 3 min)")
    ap.add_argument("--store", default=",".join(STORE_KEYS),
                    help="comma list of gateway variants: memory, memory-leased, table (strict quota), table-leased")
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip the pass-through floor target")
    ap.add_argument("--no-relay-floor", action="store_true",
                    help="skip the relay floor (bench.relay_floor: our server stack and one aiohttp call, no pipeline)")
    ap.add_argument("--skip-inprocess", action="store_true", help="no round-trip count and no profile")
    ap.add_argument("--cold-starts", type=int, help="cold starts per gateway for the median (default 5, quick 2; "
                                                     "0 keeps the harness's single sample)")
    ap.add_argument("--duration", type=int, help="measured seconds per cell (default 10, quick 2)")
    ap.add_argument("--concurrency", help="comma list (default 1,8,64, quick 1,64)")
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--requests", type=int, help="in-process requests for CPU and profile (default 1500, quick 200)")
    ap.add_argument("--cell-by-cell", action="store_true",
                    help="one harness run per mode and concurrency level, every gateway started afresh on fresh "
                         "tables: no cell inherits an earlier cell's rows, journals or warm caches")
    a = ap.parse_args(argv)
    a.stores = tuple(s for s in a.store.split(",") if s)
    if not set(a.stores) <= set(STORE_KEYS):
        ap.error(f"--store takes {', '.join(STORE_KEYS)}")
    a.duration = a.duration or (2 if a.quick else 10)
    a.warmup = 1 if a.quick else 2
    a.concurrency = a.concurrency or ("1,64" if a.quick else "1,8,64")
    a.requests = a.requests or (200 if a.quick else 1500)
    a.cold_starts = (2 if a.quick else 5) if a.cold_starts is None else a.cold_starts
    a.retries = 0 if a.quick else 1
    a.quiet_wait_max = 3 if a.quick else 8  # the box is shared: bound the wait for other users' CPU to drop
    # The harness's own hard cap; cells past it are skipped (and listed as such in the summary). A full
    # run of every target needs ~12 min of it; 660 s cut the last two stream c=64 cells.
    a.max_total_s = 140 if a.quick else 250 * (1 + len(a.stores))  # ~4 min of cells per gateway
    a.outdir = ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    peer = peer_bench_dir()
    ensure_setup(peer, need_litellm=not a.skip_litellm)
    wait_quiet(15 if a.quick else 60)
    a.outdir.mkdir(parents=True)
    prefix = "b" + a.outdir.name.replace("-", "")[2:]  # unique table prefix per run
    services = Services(a.outdir / "services", a.stores, "0").start()
    try:
        token = services.token()
        runs = harness_runs(a)
        for i, cell in enumerate(runs):
            cell_prefix = prefix if len(runs) == 1 else f"{prefix}x{i}"  # fresh tables for each run
            run_harness(peer, harness_args(a, peer, services, token, cell_prefix, cell),
                        a.outdir / (f"harness-{cell.outdir.name}.log" if len(runs) > 1 else "harness.log"))
        inprocess = {} if a.skip_inprocess else run_inprocess(a, services, prefix)
        cold = run_coldstarts(a, services, peer, prefix) if a.cold_starts else {}
    finally:
        services.stop()
    peer_results = merged([json.loads((cell.outdir / "results.json").read_text()) for cell in runs])
    summary = report.build(peer_results, inprocess, ["python -m bench.run", *(sys.argv[1:] if argv is None else argv)],
                           cold)
    (a.outdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = report.markdown(summary)
    (a.outdir / "summary.md").write_text(text)
    print("\n" + text + f"\nresults in {a.outdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

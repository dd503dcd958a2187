"""Cold start measured several times: process start → first 200 chat completion, median of N starts.

The harness times each gateway's cold start once, right after starting it beside the others. One full
run measured 1.21-1.47 s for our variants where five starts of the same code, alone, took 0.88-1.03 s
(docs/benchmarks.md). Here every process is started ``n`` times in turn, pinned as the harness pins the
gateway under test (CPU 1), against a fake upstream of our own on CPU 0; the median is what counts.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Say hello."}]}).encode()


@dataclass(frozen=True)
class Target:
    command: list[str]  # the process to start (pinned by ``measure``)
    url: str  # its chat completions URL
    headers: dict[str, str]
    env: dict[str, str]


def first_200(target: Target, limit_s: float = 180.0) -> float:
    """Start the process, poll with a chat request until it answers 200, stop it; seconds to that 200."""
    started = time.monotonic()
    proc = subprocess.Popen(["taskset", "-c", "1", *target.command], env=target.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.monotonic() - started < limit_s:
            if proc.poll() is not None:
                raise RuntimeError(f"{shlex.join(target.command)} exited with {proc.returncode} before its first 200")
            request = urllib.request.Request(target.url, BODY, {"Content-Type": "application/json", **target.headers})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except OSError:  # not listening yet, or not ready (HTTPError is an OSError too)
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{shlex.join(target.command)} gave no 200 within {limit_s:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(rounds: list[dict[str, Target]], log: Path) -> dict[str, dict[str, float | list[float]]]:
    """One cold start of every target per round, interleaved (A, B, C, then A again…) so a slow minute on
    the box is spread over all of them rather than landing on one. A round may give a target a fresh
    configuration (the gateways get fresh tables each time, as in the harness)."""
    samples: dict[str, list[float]] = {}
    with open(log, "w") as out:
        for i, targets in enumerate(rounds, 1):
            for name, target in targets.items():
                seconds = first_200(target)
                samples.setdefault(name, []).append(round(seconds, 3))
                print(f"cold start {i}/{len(rounds)} {name}: {seconds:.2f} s", file=out, flush=True)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples_s": s}
            for name, s in samples.items()}

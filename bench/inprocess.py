"""Storage round trips per request and a profile of the gateway, driven in-process.

The local host's Starlette app (exactly what ``tools.local_host`` serves) is called over raw
ASGI, so no HTTP server or client shares the profile; the upstream is the harness's fake
upstream on loopback in another process. The relay floor's app (``bench.relay_floor``) is driven
the same way, so what the gateway spends above it is measured here too, and the profile shows
where. Prints one JSON document.

    python -m bench.inprocess --settings FILE --upstream URL --key-dir DIR [--requests N] [--profile OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp as App
from starlette.types import Message

BODY = {"model": "gpt-4o-mini", "max_tokens": 64, "temperature": 0.2,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Summarise the benefits of an AI gateway in two sentences."}]}
STREAM_BODY = BODY | {"stream": True, "stream_options": {"include_usage": True}}
PATH = "/api/v1/chat/completions"


async def call(app: App, body: bytes, token: str, path: str = PATH) -> tuple[int, bytes]:
    """One POST through the ASGI app; returns status and the whole body (a stream is read to its end)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 7071), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {token}".encode()),
                         (b"content-length", str(len(body)).encode())]}
    sent = False
    status, chunks = 0, []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a disconnect would come here; the benchmark never hangs up
        return {}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def batch(app: App, body: bytes, tokens: list[str], n: int, concurrency: int,
                path: str = PATH) -> dict[int, int]:
    """``n`` requests at fixed concurrency, worker i sending as caller ``tokens[i % len(tokens)]``;
    returns a count per HTTP status."""
    statuses: dict[int, int] = defaultdict(int)
    todo = iter(range(n))

    async def worker(token: str) -> None:
        for _ in todo:
            status, _ = await call(app, body, token, path)
            statuses[status] += 1

    await asyncio.gather(*(worker(tokens[i % len(tokens)]) for i in range(concurrency)))
    return dict(statuses)


async def store_trips() -> int:
    """Round trips so far, after committing what leased quota mode has written behind."""
    from gateway_lib.runtime import get_runtime

    rt = get_runtime()
    await rt.admission.flush()
    return int(rt.store.round_trips)  # type: ignore[attr-defined]


async def round_trips(app: App, tokens: list[str], n: int) -> dict[str, Any]:
    """Storage round trips: the process's first request, then steady state per mode, concurrency and
    number of callers (one caller's requests all write that caller's counters row: ETag races)."""
    out: dict[str, Any] = {}
    status, _ = await call(app, json.dumps(BODY).encode(), tokens[0])
    out["first_request"] = {"status": status, "round_trips": await store_trips()}
    cases = [("nonstream", 1, 1), ("stream", 1, 1), ("nonstream", 8, 1), ("stream", 8, 1),
             ("nonstream", 64, 1), ("nonstream", 64, len(tokens))]
    for mode, conc, callers in cases:
        raw = json.dumps(BODY if mode == "nonstream" else STREAM_BODY).encode()
        await batch(app, raw, tokens[:callers], max(conc, 20), conc)  # warm: override and directory caches
        before = await store_trips()
        count = max(n, 2 * conc)
        statuses = await batch(app, raw, tokens[:callers], count, conc)
        out[f"{mode}_c{conc}_{callers}caller"] = {"requests": count, "statuses": statuses,
                                                  "round_trips_per_request": (await store_trips() - before) / count}
    return out


async def cpu_per_request(app: App, tokens: list[str], n: int, path: str = PATH) -> dict[str, float]:
    """Process CPU per request without a profiler (gateway + fake client side of ASGI, no HTTP server)."""
    out = {}
    for mode, body in (("nonstream", BODY), ("stream", STREAM_BODY)):
        raw = json.dumps(body).encode()
        statuses = await batch(app, raw, tokens, 50, 1, path)
        if set(statuses) != {200}:
            raise SystemExit(f"{path}: warm-up answered {statuses}")
        t0 = time.process_time()
        await batch(app, raw, tokens, n, 1, path)
        out[mode] = 1000 * (time.process_time() - t0) / n
    return out


async def floor_cpu_per_request(upstream: str, n: int) -> dict[str, float]:
    """The relay floor's CPU per request, driven exactly as the gateway is."""
    from bench.relay_floor import build_app

    return await cpu_per_request(build_app(upstream), ["unused"], n, "/v1/chat/completions")


def profile(app: App, tokens: list[str], n: int, out: Path, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """cProfile over ``n`` non-streamed plus ``n // 4`` streamed requests at c=1. The timer is process
    CPU time: with the default wall clock, time spent waiting in epoll for the upstream or Azurite
    would be charged to the gateway."""
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    loop.run_until_complete(batch(app, json.dumps(BODY).encode(), tokens, n, 1))
    loop.run_until_complete(batch(app, json.dumps(STREAM_BODY).encode(), tokens, n // 4, 1))
    prof.disable()
    prof.dump_stats(str(out))
    return summarise(pstats.Stats(str(out)), n + n // 4)


def _package(filename: str) -> str:
    """Who owns a function: gateway_lib module, third-party distribution or stdlib module."""
    if "gateway_lib" in filename:
        return "gateway_lib." + filename.rsplit("gateway_lib/", 1)[1].removesuffix(".py").replace("/", ".")
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    return "stdlib." + Path(filename).stem


def summarise(stats: pstats.Stats, requests: int) -> dict[str, Any]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in raw.values())
    by_owner: dict[str, float] = defaultdict(float)
    for (filename, _, _), (_, _, tt, _, _) in raw.items():
        by_owner[_package(filename)] += tt
    us = 1e6 / requests

    def row(key: Any, value: Any) -> dict[str, Any]:
        filename, line, name = key
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        return {"function": f"{where}:{line}({name})", "calls_per_req": round(value[1] / requests, 2),
                "self_us": round(value[2] * us, 1), "cum_us": round(value[3] * us, 1)}

    top_self = sorted(raw.items(), key=lambda kv: -kv[1][2])[:30]
    ours = [(k, v) for k, v in raw.items() if "gateway_lib" in k[0] or "tools/local_host" in k[0]]
    top_cum_ours = sorted(ours, key=lambda kv: -kv[1][3])[:40]
    return {
        "requests": requests, "profiled_us_per_request": round(total * us, 1),
        "self_time_by_owner_us": {k: round(v * us, 1) for k, v in sorted(by_owner.items(), key=lambda kv: -kv[1])[:30]},
        "top_self": [row(k, v) for k, v in top_self],
        "top_cumulative_gateway": [row(k, v) for k, v in top_cum_ours],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", type=Path, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--key-dir", type=Path, required=True, help="the dev issuer's key directory")
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--profile", type=Path, help="write pstats here and summarise the profile")
    args = ap.parse_args(argv)
    os.environ["AZURE_OPENAI_ENDPOINT"] = args.upstream
    # Imported here, in local_host's order: the loopback guard first, settings exported before first use.
    from tools import local_host, netguard

    netguard.install()
    local_host.load_local_settings(args.settings)
    # Same logging setup as the local host: request logs are part of the per-request cost.
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    import function_app
    from bench.services import BENCH_ROLE
    from tools.dev_issuer import DevIssuer

    issuer = DevIssuer(args.key_dir)
    tokens = [issuer.token(caller=f"bench-{i}", roles=[BENCH_ROLE], ttl=7200) for i in range(args.callers)]
    app: App = local_host.build_app(function_app.app)
    loop = asyncio.new_event_loop()
    result: dict[str, Any] = {"store": os.environ.get("GATEWAY_STORAGE_MODE"),
                              "quota_mode": os.environ.get("GATEWAY_QUOTA_MODE", "strict")}
    result["round_trips"] = loop.run_until_complete(round_trips(app, tokens, max(50, args.requests // 10)))
    result["cpu_ms_per_request_inprocess"] = ours = loop.run_until_complete(cpu_per_request(app, tokens[:1], args.requests))
    result["relay_floor_cpu_ms_per_request_inprocess"] = floor = loop.run_until_complete(
        floor_cpu_per_request(args.upstream, args.requests))
    result["above_relay_floor_cpu_ms"] = {mode: ours[mode] - floor[mode] for mode in ours}
    if args.profile:
        result["profile"] = profile(app, tokens[:1], args.requests, args.profile, loop)
    json.dump(result, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Client CPU per upstream call: the relay beside the clients it replaced, in one run.

Each client makes the same non-streamed chat call (and, where it can, the same streamed one) to the
harness's fake upstream, at concurrency 1, in interleaved rounds; CPU is this process's
``time.process_time`` per call, so time spent waiting on the upstream is not counted. Prints JSON:
per client and mode, the median over rounds of CPU ms per call.

    python -m bench.client_cpu --upstream URL [--calls 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.inprocess import BODY

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini"
Call = Callable[[bool], Awaitable[Any]]


async def _clients(upstream: str) -> tuple[dict[str, Call], Callable[[], Awaitable[None]]]:
    import aiohttp
    import openai

    from gateway_lib.config.settings import Settings
    from gateway_lib.operations.schema import ChatRequest
    from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider
    from gateway_lib.providers.base import CallContext
    from tools.stack import ROOT

    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values |= {"AZURE_OPENAI_ENDPOINT": upstream, "GATEWAY_STORAGE_MODE": "memory", "AZURE_OPENAI_AUTH": "api_key"}
    settings = Settings.from_env(values)
    target = settings.catalogue.targets["aoai-gpt-4o-mini-eastus"]
    relay = AzureOpenAIProvider(settings.providers.section("azure_openai"), settings.providers)
    ctx = CallContext(request_id="bench", max_tokens=64)
    requests = {stream: ChatRequest.model_validate(BODY | {"stream": stream}) for stream in (False, True)}
    timeout = openai.Timeout(120.0, connect=5.0)
    sdk = openai.AsyncAzureOpenAI(azure_endpoint=upstream, api_version=API_VERSION, api_key="bench", max_retries=0,
                                  timeout=timeout, http_client=openai.DefaultAioHttpClient(timeout=timeout))
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=120.0))
    url = f"{upstream}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    body = BODY | {"model": DEPLOYMENT}

    async def adapter(stream: bool) -> Any:
        if not stream:
            return (await relay.complete(requests[False], target, ctx)).body
        return [event async for event in relay.stream(requests[True], target, ctx)]

    async def raw_aiohttp(stream: bool) -> Any:
        payload = json.dumps(body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {}))
        async with session.post(url, data=payload.encode(), headers={"api-key": "bench",
                                                                     "Content-Type": "application/json"}) as r:
            if not stream:
                return json.loads(await r.read())
            return [chunk async for chunk in r.content.iter_any()]

    async def sdk_post(stream: bool) -> Any:
        return None if stream else await sdk.post("/chat/completions", cast_to=object, body=body)

    async def sdk_create(stream: bool) -> Any:
        return None if stream else (await sdk.chat.completions.create(**body)).model_dump()

    async def close() -> None:
        await relay.aclose()
        await sdk.close()
        await session.close()

    clients = {"relay adapter": adapter, "aiohttp alone": raw_aiohttp, "openai post (cast_to=object)": sdk_post,
               "openai chat.completions.create": sdk_create}
    return clients, close


async def measure(upstream: str, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    clients, close = await _clients(upstream)
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(rounds):
            for name, call in clients.items():
                for stream in (False, True):
                    if await call(stream) is None:
                        continue
                    for _ in range(calls // 10):  # warm the pool and the caches
                        await call(stream)
                    t0 = time.process_time()
                    for _ in range(calls):
                        await call(stream)
                    samples.setdefault((name, "stream" if stream else "nonstream"), []).append(
                        1000 * (time.process_time() - t0) / calls)
    finally:
        await close()
    out: dict[str, dict[str, float]] = {}
    for (name, mode), values in samples.items():
        out.setdefault(name, {})[mode] = round(statistics.median(values), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(measure(a.upstream.rstrip("/"), a.calls, a.rounds)), indent=1))


if __name__ == "__main__":
    main()

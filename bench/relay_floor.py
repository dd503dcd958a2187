"""The relay floor: the least any gateway on this stack can add, measured beside ours.

The same HTTP server as ``tools.local_host`` (uvicorn, httptools, the asyncio loop, Starlette) and one
``aiohttp`` call per request on one pooled session, as the Azure OpenAI relay makes it (``api-key``
header, the deployment's path, the connect and per-read timeouts), and nothing else: no token check, no
guardrails, no quota, no ledger, no telemetry, no parsing beyond the ``stream`` flag. The request body
goes up as it came; the answer (or the stream's bytes) comes back as it came. What our gateway adds
above this is the cost of its own pipeline.

    python -m bench.relay_floor --port P --upstream URL
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini"


def build_app(upstream: str) -> Starlette:
    url = f"{upstream.rstrip('/')}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    headers = {"Content-Type": "application/json", "api-key": "bench"}
    sessions: list[aiohttp.ClientSession] = []  # one, opened on the first request's loop (as the relay's)

    def session() -> aiohttp.ClientSession:
        if not sessions:
            timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=120.0)
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout))
        return sessions[0]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        for s in sessions:
            await s.close()

    async def chat(request: Request) -> Response:
        body = await request.body()
        if not json.loads(body).get("stream"):
            async with session().post(url, data=body, headers=headers) as answer:
                return Response(await answer.read(), status_code=answer.status, media_type="application/json")
        upstream_response = await session().post(url, data=body, headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream_response.content.iter_any():
                    yield chunk
            finally:
                upstream_response.release()

        return StreamingResponse(relay(), status_code=upstream_response.status, media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the fake upstream's base URL")
    a = ap.parse_args()
    uvicorn.run(build_app(a.upstream), host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                loop="asyncio", http="httptools")


if __name__ == "__main__":
    main()

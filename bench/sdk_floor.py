"""The SDK floor: the least any gateway on this stack can add, measured beside ours.

The same HTTP server as ``tools.local_host`` (uvicorn, httptools, the asyncio loop, Starlette) and
the same ``openai`` client the Azure OpenAI adapter builds (``AsyncAzureOpenAI`` on the SDK's aiohttp
transport, retries off, ``post`` with ``cast_to=object``), and nothing else: no token check, no
guardrails, no quota, no ledger, no telemetry. A request body goes to the upstream as it came; the
answer (or the stream's bytes) comes back as it came. What our gateway adds above this is the cost of
its own pipeline; what this adds above the harness's plain pass-through is the cost of the server
stack and the SDK, which the project's rules keep (providers are reached through the real SDK).

    python -m bench.sdk_floor --port P --upstream URL
"""

from __future__ import annotations

import argparse
import json

import openai
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

API_VERSION = "2024-10-21"


def build_app(upstream: str) -> Starlette:
    timeout = openai.Timeout(30.0, connect=5.0)
    client = openai.AsyncAzureOpenAI(azure_endpoint=upstream, api_version=API_VERSION, api_key="bench",
                                     max_retries=0, timeout=timeout,
                                     http_client=openai.DefaultAioHttpClient(timeout=timeout))

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        if not body.get("stream"):
            answer = await client.post("/chat/completions", cast_to=object, body=body)
            return Response(json.dumps(answer), media_type="application/json")
        stream = await client.post("/chat/completions", cast_to=object, body=body, stream=True,
                                   stream_cls=openai.AsyncStream[object])

        async def relay() -> object:
            try:
                async for chunk in stream.response.aiter_bytes():
                    yield chunk
            finally:
                await stream.close()

        return StreamingResponse(relay(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the fake upstream's base URL")
    a = ap.parse_args()
    uvicorn.run(build_app(a.upstream), host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                loop="asyncio", http="httptools")


if __name__ == "__main__":
    main()

"""Call registered user functions the way the Functions HTTP-streams worker does (a Starlette request in,
a Starlette response out), against an in-process runtime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway_lib import runtime
from gateway_lib.runtime import Runtime, set_runtime


def make_request(method: str, path: str, token: str | None, body: Any = None, query: str = "",
                 headers: dict[str, str] | None = None) -> Request:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    raw = [(b"content-type", b"application/json")] if body is not None else []
    if token:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "headers": raw, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 7071), "scheme": "http",
             "http_version": "1.1", "root_path": ""}
    return Request(scope, receive)


async def read_body(response: Response) -> bytes:
    if isinstance(response, StreamingResponse):
        return b"".join([c if isinstance(c, bytes) else c.encode() async for c in response.body_iterator])
    return bytes(response.body)


def invoke(build: Callable[[], Runtime], user_function: Callable[..., Any], request: Request) -> tuple[Response, bytes]:
    """One invocation on a fresh event loop with a runtime built for it (closed afterwards)."""

    async def run() -> tuple[Response, bytes]:
        set_runtime(build())
        try:
            response = await user_function(request)
            return response, await read_body(response)
        finally:
            assert runtime._runtime is not None
            await runtime._runtime.aclose()
            set_runtime(None)

    return asyncio.run(run())


_index: dict[str, Any] = {}


def registered_functions() -> dict[str, Any]:
    """function_app's functions by name, indexed once per process (as the worker does; a second
    ``get_functions()`` on the same app fails its duplicate-name check)."""
    if not _index:
        import function_app
        from tools.local_host import indexed

        _index.update({fn.get_function_name(): fn for fn in indexed(function_app.app)})
    return _index

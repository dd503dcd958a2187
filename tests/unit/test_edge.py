"""The request edge: a caller that hangs up while still uploading its body is a 499, not a server failure."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from gateway_lib.http import edge


def test_a_caller_hanging_up_mid_upload_is_recorded_as_499_not_500() -> None:
    messages = [{"type": "http.request", "body": b'{"model": "gpt-4o-mini", "mess', "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    request = Request({"type": "http", "method": "POST", "path": "/api/v1/chat/completions", "query_string": b"",
                       "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")]}, receive)

    async def go() -> tuple[int, str | None]:
        scope = edge.begin(request, "chat")

        async def handler() -> Any:
            await edge.read_json(request, 1_048_576)
            raise AssertionError("not reached: the body never arrived")

        response = await edge.guarded(scope, handler)
        return response.status_code, scope.error_code

    assert asyncio.run(go()) == (499, "client_disconnected")

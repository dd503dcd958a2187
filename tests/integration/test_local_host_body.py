"""The local host answers a body that never finishes, and a request it cannot parse, in the OpenAI error shape,
as the Functions front end does, instead of holding the connection or answering uvicorn's plain text."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.stack import Stack

pytestmark = pytest.mark.integration
PATH = "/api/v1/chat/completions"
ANSWER_WITHIN = 10.0  # local_host.BODY_GRACE_SECONDS (5 s), then scheduling slack on a busy machine


def exchange(port: int, head: bytes, body: bytes, trickle: bytes = b"") -> tuple[int, dict[str, str], bytes, float]:
    """Send ``head`` + ``body``, then ``trickle`` a byte a second; read the answer until the server closes."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head + body)
        answered = threading.Event()

        def drip() -> None:
            for byte in trickle:
                if answered.wait(1.0):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        answered.set()
    took = time.monotonic() - started
    head_text, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_text.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload, took


def request_head(token: str, framing: str) -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n").encode()


def test_a_body_that_stops_arriving_is_a_408_in_the_openai_shape(stack: Stack, token: str) -> None:
    cases = {
        "chunked with no end": (request_head(token, "Transfer-Encoding: chunked\r\n"), b'5\r\n{"mod\r\n', b""),
        "short Content-Length": (request_head(token, "Content-Length: 200\r\n"), b'{"model": "gpt-4o-mini"', b""),
        "a byte a second": (request_head(token, "Content-Length: 200\r\n"), b"{", b" " * 199),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # at once: each takes the grace
        answers = dict(zip(cases, pool.map(lambda c: exchange(stack.ports.host, *c), cases.values()), strict=True))
    for name, (status, headers, body, took) in answers.items():
        assert status == 408, f"{name}: {status} {body[:200]!r}"
        assert headers["content-type"] == "application/json" and headers["connection"] == "close", name
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_timeout", name
        assert took <= ANSWER_WITHIN, f"{name}: answered after {took:.1f} s"


@pytest.mark.parametrize("framing", ["Content-Length: abc\r\n", "Transfer-Encoding: chunked\r\n"],
                         ids=["a Content-Length that is no number", "a chunk size that is no number"])
def test_malformed_framing_is_a_400_in_the_openai_shape(stack: Stack, token: str, framing: str) -> None:
    body = b"zz\r\nnot a chunk\r\n0\r\n\r\n" if "chunked" in framing else b"{}"
    status, headers, payload, _ = exchange(stack.ports.host, request_head(token, framing), body)
    assert status == 400, payload[:200]
    assert headers["content-type"] == "application/json"
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http_request"

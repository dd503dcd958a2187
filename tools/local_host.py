"""Local stand-in for ``func start``: serves exactly the functions function_app.py registers.

Azure Functions Core Tools cannot be installed here, so this host reads the
``FunctionApp`` object itself (``app.get_functions()``), never a second route list.
For every HTTP trigger it mounts ``/{routePrefix}/{route}`` (routePrefix from host.json,
``api`` by default; this app sets it to "" and spells ``api/`` in its routes) with the
declared methods, and calls the user function with the Starlette request exactly as the
HTTP-streams worker does. Routing is the host's: case-insensitive, a trailing slash optional, and an unknown
route or an undeclared method an empty 404. A route the real host would refuse (one starting with "admin"
or "runtime") is refused here too, so the tests see what Azure would. Like ``func start``,
non-HTTP functions run on demand through ``POST /admin/functions/{name}``, and
function keys are not enforced locally.

    python -m tools.local_host [--host 127.0.0.1] [--port 7071]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tools.host_rules import HttpRoute

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("local_host")


class _TimerRequest:
    """What the Functions host passes a timer function (``past_due``)."""

    def __init__(self, past_due: bool = False) -> None:
        self.past_due = past_due


def route_prefix(root: Path = ROOT) -> str:
    try:
        host = json.loads((root / "host.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "api"
    prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return str(prefix).strip("/")


def indexed(function_app: Any) -> list[Any]:
    """The app's functions, indexed once: like the worker, because ``get_functions()`` builds them anew
    and a second call fails the library's duplicate-name check."""
    return list(function_app.get_functions())


def http_functions(functions: list[Any]) -> list[tuple[str, str, list[str], Callable[..., Awaitable[Any]]]]:
    """(name, route, methods, user function) for each HTTP trigger."""
    found = []
    for fn in functions:
        trigger = fn.get_trigger()
        if getattr(trigger, "type", None) != "httpTrigger":
            continue
        methods = [getattr(m, "value", str(m)).upper() for m in (trigger.methods or ["GET", "POST"])]
        route = trigger.route or fn.get_function_name()
        check_route(fn.get_function_name(), route)
        found.append((fn.get_function_name(), route, methods, fn.get_user_function()))
    return found


RESERVED_ROUTE_STARTS = ("admin", "runtime")  # the Functions host's own APIs


def check_route(name: str, route: str) -> None:
    """Refuse what the Functions host refuses: a route template starting with "admin" or "runtime" (any case,
    whatever the routePrefix) conflicts with its built-in routes, and that function never registers."""
    if route.lstrip("/").lower().startswith(RESERVED_ROUTE_STARTS):
        raise ValueError(f"function '{name}': route '{route}' conflicts with the Functions host's built-in routes "
                         f"(templates starting with {' or '.join(RESERVED_ROUTE_STARTS)} are reserved)")


def other_functions(functions: list[Any]) -> dict[str, tuple[str, Callable[..., Any]]]:
    """Non-HTTP functions by name: (binding argument name, user function)."""
    found = {}
    for fn in functions:
        trigger = fn.get_trigger()
        if getattr(trigger, "type", None) != "httpTrigger":
            found[fn.get_function_name()] = (trigger.name, fn.get_user_function())
    return found


def _endpoint(user_function: Callable[..., Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
    arg_name = next(iter(inspect.signature(user_function).parameters))

    async def endpoint(request: Request) -> Response:
        return await user_function(**{arg_name: request})

    return endpoint


def _admin_endpoint(functions: dict[str, tuple[str, Callable[..., Any]]]) -> Callable[[Request], Awaitable[Response]]:
    async def invoke(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in functions:
            return _error(404, f"no non-HTTP function named '{name}'")
        arg_name, user_function = functions[name]
        result = user_function(**{arg_name: _TimerRequest()})
        if inspect.isawaitable(result):
            await result
        return Response(status_code=202)

    return invoke


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "error"}},
                        status_code=status, headers={"x-request-id": str(uuid.uuid4())})


async def _not_found(request: Request, exc: Exception) -> Response:
    # The Functions host answers an unknown route and a method the function does not declare alike: an empty 404.
    return Response(status_code=404)


class _HostRouting:
    """ASP.NET Core routing as the Functions host does it: literal segments match case-insensitively and a
    trailing slash is the same route. The path is rewritten to the declared template's spelling for Starlette."""

    def __init__(self, app: ASGIApp, templates: list[str]) -> None:
        self.app = app
        self.routes = [HttpRoute("", t, frozenset(), "anonymous") for t in templates]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            for route in self.routes:
                values = route.match(path, "")
                if values is not None:
                    canonical = "/" + "/".join(values.get(seg.strip("{}?").split(":")[0], seg)
                                               for seg in route.template.strip("/").split("/"))
                    scope = dict(scope, path=canonical, raw_path=canonical.encode())
                    break
        await self.app(scope, receive, send)


def build_app(function_app: Any, prefix: str | None = None, functions: list[Any] | None = None) -> Starlette:
    prefix = route_prefix() if prefix is None else prefix
    base = f"/{prefix}" if prefix else ""
    functions = indexed(function_app) if functions is None else functions
    routes = [_exactly(Route(f"{base}/{route}", _endpoint(fn), methods=methods, name=name), methods)
              for name, route, methods, fn in http_functions(functions)]
    templates = [r.path for r in routes]
    routes.append(Route("/admin/functions/{name}", _admin_endpoint(other_functions(functions)), methods=["POST"]))
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found},
                     middleware=[Middleware(_HostRouting, templates=templates)], lifespan=_lifespan)


def _exactly(route: Route, methods: Any) -> Route:
    """Starlette adds HEAD to every GET route; the Functions host serves only the methods a function declares."""
    route.methods = {m.upper() for m in methods}
    return route


@contextlib.asynccontextmanager
async def _lifespan(_: Starlette) -> AsyncIterator[None]:
    """On shutdown (Ctrl-C, SIGTERM) commit what the gateway buffered before the loop goes away."""
    yield
    from gateway_lib.runtime import close_runtime

    await close_runtime()


# The Functions front end (Kestrel) answers a body that stops arriving instead of holding the connection: its
# MinRequestBodyDataRate is 240 bytes/s after a 5 s grace. The local host holds a body to the same pace.
BODY_GRACE_SECONDS = 5.0
BODY_MIN_BYTES_PER_SECOND = 240.0


def openai_error(message: str, code: str) -> bytes:
    """An error body in the OpenAI shape, as the gateway renders its own."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


class BodyDeadline:
    """ASGI middleware: a request body must keep arriving at ``min_rate`` bytes/s after ``grace`` seconds
    (a chunked body with no end, a Content-Length never reached, a trickle); otherwise 408 in the OpenAI shape,
    the connection closed, and the app told the client is gone."""

    def __init__(self, app: ASGIApp, grace: float = BODY_GRACE_SECONDS,
                 min_rate: float = BODY_MIN_BYTES_PER_SECOND) -> None:
        self.app, self.grace, self.min_rate = app, grace, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started, received = loop.time(), 0
        body_done = responded = timed_out = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done, timed_out
            if body_done or timed_out:
                return await receive()
            due = started + self.grace + received / self.min_rate
            try:
                async with asyncio.timeout_at(due):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                if not responded:
                    await _send_error(send, 408, "The request body did not arrive in time.", "request_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal responded
            if timed_out:
                return  # answered already: what the app makes of the disconnect goes nowhere
            responded = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = openai_error(message, code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", str(uuid.uuid4()).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def framing_errors_as_json() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, answering a request it cannot parse (bad chunking, a bad Content-Length,
    a malformed request line) in the OpenAI error shape instead of plain text."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # imported with uvicorn, in main()

    class FramingErrorsAsJson(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self.transport.close()  # a response is already on the wire: no second status line
                return
            body = openai_error("The request is not valid HTTP/1.1 (its framing could not be parsed).",
                                "invalid_http_request")
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(body)).encode() + b"\r\nx-request-id: " + str(uuid.uuid4()).encode()
                    + b"\r\nconnection: close\r\n\r\n")
            self.transport.write(head + body)
            self.transport.close()

    return FramingErrorsAsJson


def load_local_settings(path: Path) -> None:
    """Export local.settings.json Values like ``func start`` does (the real environment wins)."""
    if not path.exists():
        return
    values = json.loads(path.read_text()).get("Values", {})
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--settings", type=Path, default=ROOT / "local.settings.json")
    parser.add_argument("--app", default="function_app", help="module holding the FunctionApp named 'app'")
    parser.add_argument("--allow-network", action="store_true", help="do not install the loopback-only guard")
    args = parser.parse_args(argv)
    if not args.allow_network:
        from tools import netguard

        netguard.install()
    load_local_settings(args.settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    function_app = importlib.import_module(args.app).app

    import uvicorn

    app = build_app(function_app)
    served = [r for r in app.routes if not r.path.startswith("/admin/")]  # type: ignore[attr-defined]
    print(f"local host serving {len(served)} HTTP functions on http://{args.host}:{args.port}", flush=True)
    # The asyncio loop, as in the Functions worker (its uvicorn serves inside the worker's own loop), and
    # so every connection goes through the socket module the loopback guard watches (uvloop's would not).
    # HTTP parsing by httptools (a requirement), as the worker's uvicorn picks it too when installed; its framing
    # errors and bodies that stop arriving are answered in the OpenAI shape, as the Functions front end does.
    uvicorn.run(BodyDeadline(app), host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="asyncio", http=framing_errors_as_json())


if __name__ == "__main__":
    main()

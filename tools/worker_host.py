"""A test host that runs the app in the real Azure Functions Python worker, the way the Functions host does.

The worker side is tools/worker_rpc.py; this is the HTTP side. HTTP functions use HTTP streams: each call is
an InvocationRequest *and* the raw request forwarded to the worker's ``HttpUri`` with ``x-ms-invocation-id``;
the response streams back as the worker writes it, and a caller that hangs up drops the forwarded request.
Non-HTTP functions (the timer) run through ``POST /admin/functions/{name}`` with the master key; this host
answers once the invocation has finished (the real host answers 202 at once). ``GET /admin/functions`` lists
the functions with their resolved bindings, ``GET /admin/host/status`` the startup errors.

App settings come from local.settings.json (or the example), the environment winning; keys and routing
follow tools/host_rules.py. Run it with the worker's folder first on PYTHONPATH (its grpcio and protobuf):
tools/worker_stack.py does.

    python -m tools.worker_host --worker DIR [--port 7071] [--settings FILE] [--master-key K] [--function-key K]
                                [--allow-network]   # else the worker runs under tools/netguard.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import uvicorn

from tools import host_rules
from tools.host_rules import Keys
from tools.worker_rpc import ROOT, TIMER_INPUT, Function, WorkerHost, log, pb

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class HttpFront:
    """The host's HTTP side: admin API, keys, routing, and HTTP streams to the worker."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode()))
        path, method = scope["path"], scope["method"]
        if path.lower().startswith("/admin/"):
            await self._admin(path, method, headers, query, send)
            return
        found = host_rules.find_route(self.host.routes, method, path, self.host.prefix)
        if found is None:
            await _empty(send, 404)
            return
        route, values = found
        if not self.host.keys.allows(route.auth_level, host_rules.presented_key(headers, query)):
            await _empty(send, 401)
            return
        await self._stream(self.host.functions[route.function], scope, headers, query, values, receive, send)

    async def _admin(self, path: str, method: str, headers: dict[str, str], query: dict[str, str], send: Any) -> None:
        if not self.host.keys.allows("admin", host_rules.presented_key(headers, query)):
            await _empty(send, 401)
            return
        parts = path.strip("/").split("/")
        if parts == ["admin", "host", "status"] and method == "GET":
            state = "Error" if self.host.errors else "Running"
            await _json(send, 200, {"state": state, "errors": self.host.errors})
        elif parts == ["admin", "functions"] and method == "GET":
            await _json(send, 200, [{"name": f.name, "config": {"bindings": f.bindings}, "error": f.error}
                                    for f in self.host.functions.values()])
        elif len(parts) == 3 and parts[:2] == ["admin", "functions"] and method == "POST":
            function = self.host.functions.get(parts[2])
            if function is None or function.error or WorkerHost.is_http(function):
                await _empty(send, 404)
                return
            result = (await self.host.invoke(function, pb.TypedData(json=TIMER_INPUT))).result
            ok = result.status == pb.StatusResult.Success
            await _json(send, 202 if ok else 500, {} if ok else {"error": result.exception.message})
        else:
            await _empty(send, 404)

    async def _stream(self, function: Function, scope: dict[str, Any], headers: dict[str, str],
                      query: dict[str, str], values: dict[str, str], receive: Any, send: Any) -> None:
        if not self.host.http_uri:  # as the real host: the worker never pairs the request (the startup error says why)
            await asyncio.Event().wait()
        invocation_id = str(uuid.uuid4())
        url = f"http://{headers.get('host', '127.0.0.1')}{scope['path']}"
        http = pb.RpcHttp(method=scope["method"], url=url, headers=headers, query=query, params=values)
        invocation = asyncio.create_task(self.host.invoke_as(invocation_id, function, pb.TypedData(http=http), 600))
        caller = _ClientBody(receive)
        forward = {k: v for k, v in headers.items() if k not in HOP_BY_HOP} | {"x-ms-invocation-id": invocation_id}
        target = f"{self.host.http_uri}{scope['path']}" + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        has_body = "content-length" in headers or "transfer-encoding" in headers
        pumping = asyncio.create_task(caller.pump())
        relay = asyncio.create_task(self._relay(scope["method"], target, forward, caller.chunks() if has_body else None, send))
        watcher = asyncio.create_task(caller.gone.wait())
        await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not relay.done():  # the client hung up: drop the worker connection, as the host cancels its request
            relay.cancel()
            log.info("client disconnected from invocation %s", invocation_id)
        for task in (watcher, pumping):
            task.cancel()
        try:
            await relay
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("relay of invocation %s to the worker failed", invocation_id)
        result = (await invocation).result
        if result.status != pb.StatusResult.Success:
            log.error("invocation %s of %s failed: %s", invocation_id, function.name, result.exception.message)

    async def _relay(self, method: str, target: str, headers: dict[str, str], data: AsyncIterator[bytes] | None,
                     send: Any) -> None:
        assert self.session is not None
        async with self.session.request(method, target, headers=headers, data=data) as response:
            out = [(k.lower().encode(), v.encode()) for k, v in response.headers.items()
                   if k.lower() not in HOP_BY_HOP | {"date", "server"}]  # the front end's own
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientBody:
    """The caller's request body as it arrives, and whether the caller has hung up."""

    def __init__(self, receive: Any) -> None:
        self.receive = receive
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.gone = asyncio.Event()

    async def pump(self) -> None:
        more = True
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                if more:
                    await self.queue.put(None)
                return
            if more:
                await self.queue.put(message.get("body", b""))
                more = message.get("more_body", False)
                if not more:
                    await self.queue.put(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk


async def _empty(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _json(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after its shutdown, which would kill this host before it stops the worker.
        yield


async def serve(args: argparse.Namespace) -> None:
    settings = host_rules.app_settings(args.settings)
    keys = Keys(master=args.master_key, host_default=secrets.token_urlsafe(24), function_default=args.function_key)
    host = WorkerHost(args.worker, settings, keys, guard=not args.allow_network)
    await host.start()
    print(f"worker host: {len(host.routes)} HTTP functions, {len(host.functions)} in all, "
          f"{len(host.errors)} errors, on http://127.0.0.1:{args.port}", flush=True)
    front = HttpFront(host)
    await front.open()
    server = _Server(uvicorn.Config(front, host="127.0.0.1", port=args.port, log_level="warning",
                                    access_log=False, loop="asyncio", lifespan="off"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, setattr, server, "should_exit", True)
    try:
        await server.serve()
    finally:
        await front.close()
        await host.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, required=True, help="the folder holding worker.py (tools/worker_setup.py)")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--settings", type=Path, default=host_rules.settings_file(ROOT))
    parser.add_argument("--master-key", default=secrets.token_urlsafe(24))
    parser.add_argument("--function-key", default=secrets.token_urlsafe(24))
    parser.add_argument("--allow-network", action="store_true", help="no loopback-only guard in the worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

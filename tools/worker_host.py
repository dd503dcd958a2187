"""A test host that runs the app in the real Azure Functions Python worker, the way the Functions host does.

It is the gRPC server the worker connects to (``FunctionRpc.EventStream``): StartStream, WorkerInitRequest,
FunctionsMetadataRequest (the worker indexes function_app.py), one FunctionLoadRequest per function, then an
InvocationRequest per call. HTTP functions use HTTP streams: each call is an InvocationRequest *and* the raw
request forwarded to the worker's ``HttpUri`` with ``x-ms-invocation-id``; the response streams back as the
worker writes it. Non-HTTP functions (the timer) run through ``POST /admin/functions/{name}`` with the master
key; this host answers once the invocation has finished (the real host answers 202 at once).

App settings come from local.settings.json (or the example), the environment winning, with %SETTING%
resolved in bindings; keys and routing follow tools/host_rules.py. Run it with the worker's folder first on
PYTHONPATH (its grpcio and protobuf): tools/worker_stack.py does.

    python -m tools.worker_host --worker DIR [--port 7071] [--settings FILE] [--master-key K] [--function-key K]
                                [--allow-network]   # else the worker runs under tools/netguard.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import grpc  # the worker's grpcio (PYTHONPATH)
import uvicorn
from azure_functions_worker.protos import FunctionRpc_pb2 as pb
from azure_functions_worker.protos import FunctionRpc_pb2_grpc as rpc

from tools import host_rules
from tools.host_rules import HttpRoute, Keys

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("worker_host")
TIMER_INPUT = json.dumps({"Schedule": {"AdjustForDST": True}, "ScheduleStatus": None, "IsPastDue": False})
# Runs the worker with Linux's parent-death signal set: if this host dies abruptly, its worker is killed
# instead of living on (it does not exit when its stream closes). The setting survives exec.
_ORPHAN_GUARD = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                 "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


@dataclass
class Function:
    name: str
    function_id: str
    metadata: Any  # RpcFunctionMetadata as the worker reported it
    bindings: list[dict[str, Any]]  # raw bindings, %SETTING% resolved
    error: str | None = None

    @property
    def trigger(self) -> dict[str, Any]:
        return next(b for b in self.bindings if b.get("type", "").lower().endswith("trigger"))


@dataclass
class WorkerConnection:
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    def expect(self, key: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        return future

    def deliver(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        if kind == "start_stream":
            self.started.set()
        elif kind == "rpc_log":
            entry = message.rpc_log
            level = {4: logging.ERROR, 5: logging.CRITICAL, 3: logging.WARNING}.get(entry.level, logging.INFO)
            log.log(level, "[worker %s] %s%s", entry.category, entry.message,
                    f"\n{entry.exception.message}" if entry.exception.message else "")
        else:
            body = getattr(message, kind)
            key = {"function_load_response": f"load:{getattr(body, 'function_id', '')}",
                   "invocation_response": f"invoke:{getattr(body, 'invocation_id', '')}"}.get(kind, kind)
            future = self.waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(body)

    async def call(self, message: Any, key: str, timeout: float) -> Any:
        future = self.expect(key)
        await self.outbox.put(message)
        return await asyncio.wait_for(future, timeout)


class _Servicer(rpc.FunctionRpcServicer):
    def __init__(self, connection: WorkerConnection) -> None:
        self.connection = connection

    async def EventStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async def read() -> None:
            async for message in request_iterator:
                self.connection.deliver(message)

        reader = asyncio.create_task(read())
        try:
            while True:
                get = asyncio.create_task(self.connection.outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return
                yield get.result()
        finally:
            reader.cancel()


class WorkerHost:
    def __init__(self, worker_dir: Path, settings: dict[str, str], keys: Keys, app_dir: Path = ROOT,
                 guard: bool = True) -> None:
        self.worker_dir, self.settings, self.keys, self.app_dir, self.guard = worker_dir, settings, keys, app_dir, guard
        self.prefix = host_rules.route_prefix(app_dir)
        self.connection = WorkerConnection()
        self.functions: dict[str, Function] = {}
        self.errors: list[str] = []
        self.http_uri: str | None = None
        self.routes: list[HttpRoute] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.server: Any = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**31 - 1)])
        rpc.add_FunctionRpcServicer_to_server(_Servicer(self.connection), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server
        self.process = self._spawn(port)
        await asyncio.wait_for(self.connection.started.wait(), 60)
        await self._init()
        await self._index_and_load()
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        # The worker orders sys.path itself (worker.py), as under Core Tools; PYTHONPATH holds only the loopback
        # guard's sitecustomize, which shadows no package. CONTAINER_NAME / WEBSITE_INSTANCE_ID would make it
        # take Azure's code paths (a re-exec with Azure's PYTHONPATH, Linux Consumption's package handling).
        env = {k: v for k, v in self.settings.items() if k not in ("PYTHONPATH", "CONTAINER_NAME", "WEBSITE_INSTANCE_ID")}
        env["AzureWebJobsScriptRoot"] = str(self.app_dir)
        if self.guard:
            env["PYTHONPATH"] = str(Path(__file__).resolve().parent / "worker_netguard")
        args = [sys.executable, "-c", _ORPHAN_GUARD, str(self.worker_dir / "worker.py"), "--host", "127.0.0.1",
                "--port", str(port), "--workerId", str(uuid.uuid4()), "--requestId", str(uuid.uuid4()),
                "--grpcMaxMessageLength", "2147483647"]
        return subprocess.Popen(args, cwd=self.app_dir, env=env, start_new_session=True)

    async def _init(self) -> None:
        request = pb.StreamingMessage(request_id=str(uuid.uuid4()), worker_init_request=pb.WorkerInitRequest(
            host_version="4.1037.0", function_app_directory=str(self.app_dir), worker_directory=str(self.worker_dir),
            capabilities={"RpcHttpBodyOnly": "true", "TypedDataCollection": "true"}))
        response = await self.connection.call(request, "worker_init_response", 60)
        if response.result.status != pb.StatusResult.Success:
            raise RuntimeError(f"worker init failed: {response.result.exception.message}")
        self.http_uri = response.capabilities.get("HttpUri") or None
        log.info("worker initialised; HttpUri=%s", self.http_uri)

    async def _index_and_load(self) -> None:
        request = pb.StreamingMessage(request_id=str(uuid.uuid4()), functions_metadata_request=pb.FunctionsMetadataRequest(
            function_app_directory=str(self.app_dir)))
        response = await self.connection.call(request, "function_metadata_response", 120)
        if response.result.status != pb.StatusResult.Success:
            self._error(f"Worker failed to index functions: {response.result.exception.message}")
            return
        for metadata in response.function_metadata_results:
            function = self._resolved(metadata)
            self.functions[function.name] = function
            if function.error is None:
                await self._load(function)
        self.routes = [self._route(f) for f in self.functions.values() if f.error is None and self.is_http(f)]
        if self.routes and not self.http_uri:
            self._error("HTTP functions are loaded but the worker reported no HttpUri: HTTP streams need "
                        "PYTHON_ENABLE_INIT_INDEXING=1 (every HTTP call would wait until the front end's timeout)")

    def _resolved(self, metadata: Any) -> Function:
        function_id = metadata.function_id or str(uuid.uuid4())
        raw = [json.loads(b) for b in metadata.raw_bindings]
        try:
            bindings = host_rules.resolve(raw, self.settings)
            return Function(metadata.name, function_id, metadata, bindings)
        except host_rules.UnresolvedSetting as exc:
            self._error(f"Function '{metadata.name}': {exc}")
            return Function(metadata.name, function_id, metadata, raw, error=str(exc))

    async def _load(self, function: Function) -> None:
        request = pb.StreamingMessage(request_id=str(uuid.uuid4()), function_load_request=pb.FunctionLoadRequest(
            function_id=function.function_id, metadata=function.metadata))
        response = await self.connection.call(request, f"load:{function.function_id}", 60)
        if response.result.status != pb.StatusResult.Success:
            function.error = response.result.exception.message
            self._error(f"Function '{function.name}' failed to load: {function.error}")

    def _error(self, message: str) -> None:
        self.errors.append(message)
        log.error("%s", message)

    @staticmethod
    def is_http(function: Function) -> bool:
        return function.trigger.get("type", "").lower() == "httptrigger"

    @staticmethod
    def _route(function: Function) -> HttpRoute:
        trigger = function.trigger
        return HttpRoute(function.name, trigger.get("route") or function.name,
                         frozenset(m.upper() for m in trigger.get("methods") or ()),
                         str(trigger.get("authLevel", "function")).lower())

    async def invoke(self, function: Function, data: Any, timeout: float = 300) -> Any:
        invocation_id = str(uuid.uuid4())
        return await self.invoke_as(invocation_id, function, data, timeout)

    async def invoke_as(self, invocation_id: str, function: Function, data: Any, timeout: float) -> Any:
        request = pb.StreamingMessage(request_id=str(uuid.uuid4()), invocation_request=pb.InvocationRequest(
            invocation_id=invocation_id, function_id=function.function_id,
            input_data=[pb.ParameterBinding(name=function.trigger["name"], data=data)]))
        return await self.connection.call(request, f"invoke:{invocation_id}", timeout)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # KeyboardInterrupt: the worker's exit handlers run
            for _ in range(100):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.server is not None:
            await self.server.stop(1)


class HttpFront:
    """The host's HTTP side: admin API, keys, routing, and HTTP streams to the worker."""

    def __init__(self, host: WorkerHost) -> None:
        self.host = host

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
        assert self.host.session is not None
        if not self.host.http_uri:  # what the real host does here: wait for a request the worker never pairs
            await asyncio.sleep(3600)
        invocation_id = str(uuid.uuid4())
        url = f"http://{headers.get('host', '127.0.0.1')}{scope['path']}"
        http = pb.RpcHttp(method=scope["method"], url=url, headers=headers, query=query, params=values)
        invocation = asyncio.create_task(self.host.invoke_as(invocation_id, function, pb.TypedData(http=http), 600))
        body: asyncio.Queue[bytes | None] = asyncio.Queue()
        gone = asyncio.Event()

        async def pump() -> None:
            more = True
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if more:
                        await body.put(None)
                    return
                if more:
                    await body.put(message.get("body", b""))
                    more = message.get("more_body", False)
                    if not more:
                        await body.put(None)

        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await body.get()) is not None:
                yield chunk

        forward_headers = {k: v for k, v in headers.items() if k not in HOP_BY_HOP} | {"x-ms-invocation-id": invocation_id}
        target = f"{self.host.http_uri}{scope['path']}" + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        pumping = asyncio.create_task(pump())
        relay = asyncio.create_task(self._relay(scope["method"], target, forward_headers, chunks(), send))
        watcher = asyncio.create_task(gone.wait())
        await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not relay.done():  # the client hung up: drop the worker connection, as the host cancels its request
            relay.cancel()
            log.info("client disconnected from invocation %s", invocation_id)
        for task in (watcher, pumping):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await relay
        result = (await invocation).result
        if result.status != pb.StatusResult.Success:
            log.error("invocation %s of %s failed: %s", invocation_id, function.name, result.exception.message)

    async def _relay(self, method: str, target: str, headers: dict[str, str], data: AsyncIterator[bytes],
                     send: Any) -> None:
        assert self.host.session is not None
        async with self.host.session.request(method, target, headers=headers, data=data) as response:
            out = [(k.lower().encode(), v.encode()) for k, v in response.headers.items()
                   if k.lower() not in HOP_BY_HOP | {"date", "server"}]  # the front end's own
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


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
    server = _Server(uvicorn.Config(HttpFront(host), host="127.0.0.1", port=args.port, log_level="warning",
                                    access_log=False, loop="asyncio", lifespan="off"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, setattr, server, "should_exit", True)
    try:
        await server.serve()
    finally:
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

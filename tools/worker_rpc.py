"""The worker side of the test host: starts the real Azure Functions Python worker and drives it over gRPC.

This is the gRPC server the worker connects to (``FunctionRpc.EventStream``): StartStream, WorkerInitRequest
(the worker answers with ``HttpUri`` when HTTP streams are on), FunctionsMetadataRequest (the worker indexes
function_app.py), one FunctionLoadRequest per function, then an InvocationRequest per call. Bindings get
%SETTING% resolved from the app settings, as the host does before it loads a function. Imported with the
worker's folder first on PYTHONPATH (its grpcio and protobuf, and the generated protobuf modules).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc  # the worker's grpcio (PYTHONPATH)
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

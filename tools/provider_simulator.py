"""Provider simulator: Azure OpenAI, Bedrock Runtime and STS wire formats on loopback.

A dev/test/benchmark upstream, never imported by ``gateway_lib``. The real ``openai``
and ``boto3`` clients talk to it unchanged. Start it with::

    python -m tools.provider_simulator --port 7072 [--latency-ms 50] [--chunk-delay-ms 5]

or in-process with ``start_in_thread()``. Routes (a fault's ``target`` is the deployment or model id):

* Azure OpenAI (``api-key`` or ``Authorization: Bearer``): ``POST /openai/deployments/{d}/chat/completions``
  and ``.../embeddings`` with ``?api-version=``; the v1 paths ``POST /openai/v1/chat/completions``,
  ``/openai/v1/embeddings`` and ``/openai/v1/responses`` take the deployment from the body's ``model``;
  ``POST /openai/responses?api-version=`` (the preview path ``AzureOpenAI`` uses); ``GET``/``DELETE``
  ``/openai/v1/responses/{id}`` and ``/openai/responses/{id}?api-version=``. Chat: ``tools.sim_azure_chat``
  (``n``, ``logprobs``, ``response_format`` JSON schema, forced ``tool_choice``); embeddings:
  ``tools.sim_embeddings``; Responses API: ``tools.sim_responses``.
* Bedrock Runtime (SigV4 or bearer): ``POST /model/{id}/converse`` and ``/converse-stream``
  (``tools.sim_bedrock``); ``/model/{id}/invoke`` and ``/invoke-with-response-stream`` with Anthropic
  Messages, Titan Text Embeddings V2 or Cohere Embed v3 bodies (``tools.sim_invoke``).
* STS ``POST /`` ``AssumeRoleWithWebIdentity`` (``tools.sim_sts``).

Structured answers (a JSON schema in ``response_format``, ``text.format``, a forced tool) are
deterministic values of the schema (``tools.sim_schema``); embeddings are deterministic per input.
Tests steer the simulator over HTTP:

* ``POST /_sim/faults`` ``{"target": "gpt-4o-mini" | "<modelId>" | "sts" | "*", "mode": "status" | "slow" |
  "stall" | "cut" | "malformed", "status": 429, "retry_after": 2, "delay_ms": 500, "after_chunks": 2, "count": 3,
  "provider": "azure_openai" | "bedrock" | "sts", "error_type": "ModelTimeoutException", "message": "..."}``.
  ``status`` with ``after_chunks`` on a stream is a mid-stream error event; ``cut``/``malformed`` on a stream
  strike after ``after_chunks`` frames (default 1); ``stall`` pauses a stream there for ``delay_ms`` and then
  carries on (on a whole answer it is ``slow``); ``count`` absent = until ``DELETE /_sim/faults``. Every
  POST route above serves faults the same way (reading or deleting a stored response takes none).
* ``GET /_sim/stats`` (per-target counts, last request's redacted headers and body, STS claims),
  ``POST /_sim/reset`` (clear stats and stored responses), ``GET|POST /_sim/config`` (latency, STS audience
  and expiry...).

Token counts follow the rule documented in ``tools.sim_text``. Words in the last user message
steer the answer (``tools.sim_text``): ``CALL_TOOL`` (a tool call, when tools are offered),
``SIM_REPLY_WORDS=500`` (a long reply), ``SIM_FILTER_PROMPT`` (Azure's input filter refuses the
prompt: 400 ``content_filter``), ``SIM_FILTER_OUTPUT`` (the output filter stops the answer half-way:
Azure ``finish_reason: content_filter``, Bedrock ``stopReason: content_filtered``). A turn that only
returns tool results is answered in text unless a tool is forced.
"""

from __future__ import annotations

import argparse
import socket
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import uvicorn

from . import sim_azure, sim_azure_chat, sim_bedrock, sim_embeddings, sim_invoke, sim_responses, sim_sts
from .sim_http import BodyTooLarge, Receive, Request, Scope, Send, read_request, send_json
from .sim_state import ConfigError, SimConfig, SimState, redact_headers

HOST = "127.0.0.1"
_DEPLOYMENTS = "/openai/deployments/"
_AZURE_OPERATIONS = {"chat/completions": sim_azure_chat.handle_chat, "embeddings": sim_embeddings.handle_embeddings}
_RESPONSES_PATHS = ("/openai/v1/responses/", "/openai/responses/")
_BEDROCK_ACTIONS = ("/converse", "/converse-stream", "/invoke", "/invoke-with-response-stream")
_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
# Longer than any client pool's idle expiry, so the client, not the server, retires idle
# connections; otherwise a reused connection can race the server's close.
KEEP_ALIVE_S = 75


class Simulator:
    """The ASGI app; ``state`` is shared with whoever started it."""

    def __init__(self, state: SimState | None = None) -> None:
        self.state = state or SimState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            request = await read_request(scope, receive)
        except BodyTooLarge:
            await send_json(send, 413, {"message": "Request body too large."})
            return
        except TimeoutError:
            await send_json(send, 408, {"message": "Request body not received in time."})
            return
        await self.route(request, send)

    async def route(self, request: Request, send: Send) -> None:
        path = request.path
        if path.startswith("/_sim/"):
            await self.control(request, send)
        elif path.startswith(_RESPONSES_PATHS) and request.method in ("GET", "DELETE"):
            response_id = unquote(path.rsplit("/", 1)[-1])
            self._record(sim_azure.PROVIDER, "responses", request)
            await sim_responses.handle_stored(request, response_id, self.state, send, "/v1/" not in path)
        elif request.method != "POST":
            await send_json(send, 405, {"message": f"{request.method} not allowed on {path}"})
        elif path.startswith("/openai/"):
            await self._azure(request, send)
        elif path.startswith("/model/") and path.endswith(_BEDROCK_ACTIONS):
            encoded, _, action = path[len("/model/"):].rpartition("/")
            model_id = unquote(encoded)
            self._record(sim_bedrock.PROVIDER, model_id, request)
            if action.startswith("converse"):
                await sim_bedrock.handle_converse(request, model_id, action == "converse-stream", self.state, send)
            else:
                await sim_invoke.handle_invoke(request, model_id, action != "invoke", self.state, send)
        elif path == "/":
            self._record(sim_sts.PROVIDER, sim_sts.TARGET, request, form=True)
            await sim_sts.handle_sts(request, self.state, send)
        else:
            await send_json(send, 404, _NOT_FOUND)

    async def _azure(self, request: Request, send: Send) -> None:
        """Azure OpenAI: ``/openai/deployments/{d}/...`` (api-version required) and ``/openai/v1/...`` (model in body)."""
        path, body = request.path, request.json()
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        if path in ("/openai/v1/responses", "/openai/responses"):
            self._record(sim_azure.PROVIDER, model or "responses", request)
            await sim_responses.handle_create(request, self.state, send, path == "/openai/responses")
            return
        if path.startswith(_DEPLOYMENTS):
            deployment, _, operation = unquote(path[len(_DEPLOYMENTS):]).partition("/")
            versioned = True
        elif path.startswith("/openai/v1/"):
            deployment, operation, versioned = model or "", path[len("/openai/v1/"):], False
        else:
            deployment, operation, versioned = "", "", False
        handler = _AZURE_OPERATIONS.get(operation)
        if handler is None:
            await send_json(send, 404, _NOT_FOUND)
            return
        if not deployment:
            await send_json(send, 400, sim_azure.invalid("Missing required parameter: 'model'.", "model"))
            return
        self._record(sim_azure.PROVIDER, deployment, request)
        await handler(request, deployment, self.state, send, versioned)

    def _record(self, provider: str, target: str, request: Request, form: bool = False) -> None:
        body: Any = _redacted_form(request.body) if form else request.json()
        if body is None and request.body:
            body = request.body[:4096].decode("utf-8", "replace")
        last = {"method": request.method, "path": request.path, "query": request.query,
                "headers": redact_headers(request.headers), "body": body}
        self.state.stats.record(provider, target, last)

    async def control(self, request: Request, send: Send) -> None:
        """The ``/_sim/*`` endpoints tests use to inject faults and read what arrived."""
        state, key = self.state, (request.method, request.path)
        try:
            if key == ("POST", "/_sim/faults"):
                fault = state.faults.add(request.json())
                await send_json(send, 201, {"id": fault.id, "faults": state.faults.snapshot()})
            elif key == ("DELETE", "/_sim/faults"):
                state.faults.clear()
                await send_json(send, 200, {"faults": []})
            elif key == ("GET", "/_sim/faults"):
                await send_json(send, 200, {"faults": state.faults.snapshot()})
            elif key == ("GET", "/_sim/stats"):
                await send_json(send, 200, state.stats.snapshot())
            elif key == ("POST", "/_sim/reset"):
                state.stats.reset()
                state.responses.clear()
                await send_json(send, 200, {"reset": True})
            elif key == ("POST", "/_sim/config"):
                state.config.update(request.json() or {})
                await send_json(send, 200, vars(state.config))
            elif key in (("GET", "/_sim/config"), ("GET", "/_sim/health")):
                await send_json(send, 200, vars(state.config))
            else:
                await send_json(send, 404, {"message": f"no control endpoint {request.method} {request.path}"})
        except (ConfigError, TypeError, ValueError) as exc:
            await send_json(send, 400, {"message": str(exc)})


def _redacted_form(body: bytes) -> dict[str, str]:
    form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    if "WebIdentityToken" in form:
        form["WebIdentityToken"] = "***"
    return form


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(config: SimConfig | None = None) -> Simulator:
    """The simulator's ASGI app (its ``state`` holds config, faults and stats)."""
    return Simulator(SimState(config=config or SimConfig.from_env()))


def bind_loopback(port: int) -> socket.socket:
    """A listening-ready socket on 127.0.0.1 (port 0 = a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def server_config(app: Simulator) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=2048,
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5)


@dataclass
class RunningSimulator:
    """A simulator serving from a background thread; a context manager that stops it."""

    app: Simulator
    port: int
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def state(self) -> SimState:
        return self.app.state

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(config: SimConfig | None = None, port: int = 0, timeout: float = 10.0) -> RunningSimulator:
    """Serve a new simulator on 127.0.0.1 from a daemon thread; returns once it accepts connections."""
    app = create_app(config)
    sock = bind_loopback(port)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="provider-simulator", daemon=True)
    thread.start()
    running = RunningSimulator(app, sock.getsockname()[1], server, thread)
    for _ in range(int(timeout / 0.01)):
        if server.started:
            return running
        if not thread.is_alive():
            break
        threading.Event().wait(0.01)
    running.stop()
    raise RuntimeError("provider simulator did not start")


class _AnnouncingServer(uvicorn.Server):
    """Prints the ready line once the socket accepts connections (scripts wait for it)."""

    def __init__(self, config: uvicorn.Config, port: int) -> None:
        super().__init__(config)
        self.port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        print(f"provider-simulator listening on http://{HOST}:{self.port}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = SimConfig.from_env()
    parser = argparse.ArgumentParser(prog="python -m tools.provider_simulator", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7072, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--latency-ms", type=int, default=env.latency_ms, help="added before every answer "
                        "(default: SIM_LATENCY_MS or 0)")
    parser.add_argument("--chunk-delay-ms", type=int, default=env.chunk_delay_ms, help="between stream frames "
                        "(default: SIM_CHUNK_DELAY_MS or 0)")
    parser.add_argument("--api-key", default=None, help="Azure api-key to require (default: accept any)")
    parser.add_argument("--sts-audience", default=None, help="web identity token audience to require")
    parser.add_argument("--sts-expiry-seconds", type=int, default=900, help="lifetime of STS credentials")
    parser.add_argument("--deployment", action="append", default=[], metavar="NAME=MODEL",
                        help="model name reported for an Azure deployment (repeatable)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    config = SimConfig(latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms, azure_api_key=args.api_key,
                       sts_audience=args.sts_audience, sts_expiry_seconds=args.sts_expiry_seconds)
    for pair in args.deployment:
        name, _, model = pair.partition("=")
        config.deployment_models[name] = model or name
    return config


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sock = bind_loopback(args.port)
    server = _AnnouncingServer(server_config(create_app(config_from_args(args))), sock.getsockname()[1])
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()

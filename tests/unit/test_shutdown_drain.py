"""A graceful shutdown waits for the settlements under way, not for ones started after it began: another
runtime of the process may be serving steady traffic meanwhile (close_runtime drops the runtime before it
closes it), and chasing those would keep the old one from committing its journal and returning its leases."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

from gateway_lib.auth.identity import Caller
from gateway_lib.config.settings import Settings
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import Completion, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore

ROOT = Path.cwd()


class SlowStore(MemoryTableStore):
    """Table Storage's round trip for a settle's transaction: 20 ms."""

    async def transact(self, *a: Any, **k: Any) -> Any:
        await asyncio.sleep(0.02)
        return await super().transact(*a, **k)


def quick(call: Call) -> Completion:
    body = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}], "model": call.target.model}
    return Completion(body=body, usage=Usage(5, 1))


def _runtime() -> Runtime:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values["GATEWAY_STORAGE_MODE"] = "memory"
    rt = build_runtime(Settings.from_env(values), store=SlowStore())
    rt.providers = dict.fromkeys(("azure_openai", "bedrock"), MockProvider(quick))
    return rt


def _request(rt: Runtime, i: int) -> Any:
    tier = rt.settings.tiers.tiers["standard"]
    caller = Caller(app_id=f"app-{i}", tenant_id="t-1", user_id=None, tier=tier,
                    roles=frozenset({"Gateway.Standard"}), scopes=frozenset(), is_admin=False)
    scope = Scope(request_id=f"r{i}", trace_id="0" * 31 + "1", traceparent="00-" + "0" * 31 + "1-" + "0" * 15 + "1-01",
                  route="chat")
    return pipeline.complete(rt, scope, caller, CHAT_COMPLETIONS, ChatRequest(model="gpt-4o-mini",
                                                           messages=[{"role": "user", "content": "hi"}]))


def test_a_graceful_shutdown_is_not_held_up_by_another_runtimes_traffic() -> None:
    async def run() -> None:
        old, new = _runtime(), _runtime()
        await _request(new, -1)  # load the tokenizer first
        ids = itertools.count()
        stop = asyncio.Event()
        inflight: set[asyncio.Task[Any]] = set()

        async def traffic() -> None:  # the replacement runtime: a request every 5 ms, each settled in ~20 ms
            while not stop.is_set():
                task = asyncio.create_task(_request(new, next(ids)))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                await asyncio.sleep(0.005)

        driver = asyncio.create_task(traffic())
        await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(old.aclose(), 2.0)  # nothing of its own to wait for
            closed = True
        except TimeoutError:
            closed = False
        finally:
            stop.set()
            await driver
            await asyncio.gather(*inflight, return_exceptions=True)
        assert closed, ("the old runtime's aclose did not return within 2 s: accounting.drain() waits for the "
                        "settlements of requests another runtime keeps serving")

    asyncio.run(run())

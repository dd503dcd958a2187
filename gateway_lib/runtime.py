"""The process-wide runtime: settings plus the long-lived clients built from them.

Built lazily on the first request (never at import, so a bad setting cannot stop the
host from indexing the functions) and reused across invocations, which keeps
connection pools warm. A runtime belongs to the event loop it was built on; tests
that run several loops get a fresh one per loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway_lib.auth.authenticator import Authenticator
from gateway_lib.billing import settlements
from gateway_lib.config.settings import ConfigError, Settings, get_settings
from gateway_lib.errors import ServiceUnavailable
from gateway_lib.guardrails import tokens
from gateway_lib.operations.response_owners import ResponseOwners
from gateway_lib.privacy import install_privacy_filter
from gateway_lib.providers import registry
from gateway_lib.providers.base import Provider
from gateway_lib.quota.admission import Admission
from gateway_lib.quota.leases import LeasedAdmission
from gateway_lib.routing.target_health import TargetHealth
from gateway_lib.storage.base import TableStore
from gateway_lib.telemetry import Telemetry

log = logging.getLogger("gateway.runtime")


@dataclass
class Runtime:
    settings: Settings
    authenticator: Authenticator
    providers: Mapping[str, Provider]
    health: TargetHealth
    store: TableStore
    admission: Admission
    telemetry: Telemetry
    response_owners: ResponseOwners  # who made each response a target keeps
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    warm: bool = field(default=False, repr=False)

    def warmed_up(self) -> None:
        """After the first request: move everything alive now (modules, SDK clients, the tokenizer tables)
        out of the cyclic collector's reach: the SDKs allocate enough to trigger full collections, each
        walking all of them on a request's path (docs/benchmark-history.md). Later garbage is collected as usual."""
        if not self.warm:
            self.warm = True
            gc.freeze()

    async def aclose(self) -> None:
        await settlements.drain()  # settlements of requests the host cancelled, before the journal is committed
        await self.admission.aclose()  # commits a leased journal while storage is still open
        for provider in self.providers.values():
            await provider.aclose()
        await self.store.aclose()
        self.telemetry.close()


def build_runtime(settings: Settings, *, credentials: Mapping[str, Any] | None = None, table_credential: Any = None,
                  store: TableStore | None = None) -> Runtime:
    """Wire the components. Credentials are injectable, per provider name: tests and the local stack never
    build a managed-identity credential (it would call the instance metadata endpoint)."""
    # azure-core logs every storage call (headers included) at INFO, on the hot path; the request record
    # says it all once.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    # At DEBUG the SDKs log whole request and response bodies (prompts, completions) and, for botocore,
    # signed headers and STS replies with session credentials: never below WARNING, whatever the root says.
    for name in ("httpx2", "httpx", "httpcore", "openai", "botocore", "boto3", "urllib3", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    install_privacy_filter()
    # Building the BPE tables takes ~0.3 s: do it beside the first request rather than inside it.
    # Only o200k (the GPT-4o family); cl100k (+31 MiB) loads on the first Claude/GPT-4 estimate.
    threading.Thread(target=tokens.preload, args=(("o200k_base",),), name="tokenizer-preload", daemon=True).start()
    store = store or _store(settings, table_credential)
    telemetry = Telemetry.from_settings(settings)
    return Runtime(
        settings=settings,
        authenticator=Authenticator(settings.auth, settings.tiers),
        providers=build_providers(settings, credentials or {}),
        health=TargetHealth(),
        store=store,
        admission=(LeasedAdmission if settings.storage.quota_mode == "leased" else Admission)(store, settings),
        telemetry=telemetry,
        response_owners=ResponseOwners(store, settings.storage.table_prefix),
    )


def build_providers(settings: Settings, credentials: Mapping[str, Any]) -> dict[str, Provider]:
    """One adapter per registered provider, each from its own settings section."""
    return {name: spec.build(settings.providers.section(name), settings.providers, credentials.get(name))
            for name, spec in registry.specs().items()}


def _store(settings: Settings, credential: Any) -> TableStore:
    """The store, every call of it bounded in time and refused at once while storage is known down."""
    from gateway_lib.storage.circuit import GuardedStore

    s = settings.storage
    if s.mode == "memory":
        from gateway_lib.storage.memory import MemoryTableStore

        return GuardedStore(MemoryTableStore())
    table = _table_store(settings, credential)
    if s.quota_mode == "leased":  # usage is written behind: keep its commits off the request loop
        from gateway_lib.storage.threaded import StorageThread

        return GuardedStore(StorageThread(table))
    return GuardedStore(table)


def _table_store(settings: Settings, credential: Any) -> TableStore:
    from gateway_lib.storage.azure_tables import AzureTableStore

    s = settings.storage
    if s.connection_string:
        return AzureTableStore.from_connection_string(s.connection_string)
    if credential is None:
        from azure.identity.aio import ManagedIdentityCredential

        credential = ManagedIdentityCredential(client_id=settings.providers.azure_client_id)
    assert s.table_endpoint is not None  # settings validation guarantees one of the two
    return AzureTableStore.from_endpoint(s.table_endpoint, credential)


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """The runtime for the running loop; a configuration problem becomes a clear 503."""
    global _runtime
    loop = _running_loop()
    if _runtime is None or (_runtime.loop is not None and _runtime.loop is not loop):
        try:
            settings = get_settings()
        except Exception as exc:
            if isinstance(exc, ConfigError):
                # The full list goes to the operator's log; the anonymous /api/health names the settings only.
                log.error("gateway configuration is invalid", extra={"problems": exc.problems})
            else:  # a setting the validation did not foresee: still a configuration error
                log.exception("gateway settings could not be read", extra={"error": type(exc).__name__})
            raise ServiceUnavailable("The gateway is misconfigured; an operator can see why at /api/health.",
                                     code="configuration_error") from None
        rt = build_runtime(settings)
        rt.loop = loop
        _runtime = rt
    return _runtime


def try_runtime() -> tuple[Runtime | None, list[str]]:
    """For /api/health: the runtime, or the configuration problems that prevent building it."""
    try:
        return get_runtime(), []
    except ServiceUnavailable:
        try:
            get_settings()
        except ConfigError as exc:
            return None, exc.problems
        except Exception:
            return None, ["settings: unreadable (see the function's log)"]
        return None, ["runtime could not be built"]


async def close_runtime() -> None:
    """Graceful shutdown: commit buffered usage (leased quota mode), close clients. Hosts that offer a
    shutdown hook call it; without one, leased mode's journal is committed every flush interval."""
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None and rt.loop is _running_loop():
        await rt.aclose()


def set_runtime(rt: Runtime | None) -> None:
    """Install a runtime built by a test (or clear it)."""
    global _runtime
    if rt is not None and rt.loop is None:
        rt.loop = _running_loop()
    _runtime = rt


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

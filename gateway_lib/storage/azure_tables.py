"""``AzureTableStore``: ``TableStore`` on Azure Table Storage (or Azurite) via ``azure.data.tables.aio``.

One ``TableServiceClient`` per process and one ``TableClient`` per table, all sharing one
aiohttp transport, so warm invocations reuse pooled connections. Timeouts are short and
SDK retries few: quota admission sits on every request's hot path, and when storage is
down the gateway must answer 503 (or fail open) in seconds, not hang.

Azure errors become storage errors here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal
from urllib.request import getproxies_environment

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.rest import HttpRequest
from azure.data.tables import EdmType, EntityProperty, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from gateway_lib.storage import batch
from gateway_lib.storage.base import (
    Entity,
    EntityExists,
    EntityNotFound,
    Op,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    StorageUnreachable,
    TableNotFound,
    TransactionFailed,
)
from gateway_lib.storage.memory import check_key, check_transaction, normalise_properties

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

# connection_timeout / read_timeout go to the aiohttp transport; one SDK retry absorbs a
# dropped pooled connection, more would only stretch the time to a 503.
CLIENT_OPTIONS: dict[str, Any] = {
    "connection_timeout": 2.0,
    "read_timeout": 5.0,
    "retry_total": 1,
    "retry_backoff_factor": 0.2,
    "retry_backoff_max": 1.0,
}
_PAGE = 1000  # the service's own page size limit
_REASONS: dict[str, Literal["exists", "precondition", "not_found"]] = {
    "EntityAlreadyExists": "exists",
    "UpdateConditionNotSatisfied": "precondition",
    "ConditionNotMet": "precondition",
    "EntityNotFound": "not_found",
    "ResourceNotFound": "not_found",
}


class AzureTableStore:
    """``TableStore`` backed by Azure Table Storage / Azurite."""

    def __init__(self, service: TableServiceClient) -> None:
        self._service = service
        self._tables: dict[str, TableClient] = {}
        self.round_trips = 0

    @classmethod
    def from_connection_string(cls, connection_string: str, **options: Any) -> AzureTableStore:
        """Local development and tests (Azurite)."""
        return cls(TableServiceClient.from_connection_string(connection_string, **client_options(options)))

    @classmethod
    def from_endpoint(cls, endpoint: str, credential: AsyncTokenCredential, **options: Any) -> AzureTableStore:
        """Azure: ``https://<account>.table.core.windows.net`` reached with a managed identity credential."""
        return cls(TableServiceClient(endpoint, credential=credential, **client_options(options)))

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        try:
            with _translated():
                found = await self._client(table).get_entity(partition_key, row_key)
        except EntityNotFound:
            return None
        return _entity(found)

    async def insert(self, table: str, entity: Entity) -> Entity:
        answers: list[Any] = []
        try:
            with _translated():
                meta = await self._client(table).create_entity(_to_azure(entity), raw_response_hook=answers.append)
        except EntityExists as exc:
            if _retried(answers):
                raise _outcome_unknown("insert") from exc
            raise
        return _stored(entity, meta)

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        """A conditional replace, written like ``transact`` (ADR 0008). It is strict quota mode's
        reservation, on every request; the SDK's ``update_entity`` spent more CPU serialising the one
        row than a whole two-row transaction costs written directly."""
        client = self._client(table)
        account = _account(client)
        status, headers, answer, attempts = await self._send(
            client, "PUT", batch.entity_url(f"{account}/{table}", entity), batch.entity_json(entity),
            {"Content-Type": "application/json", "If-Match": etag})
        if status != 204:
            if attempts > 1 and status == 412:
                raise _outcome_unknown("conditional update")
            raise _refused(status, *batch.error(answer))
        return _stored(entity, {"etag": headers.get("ETag")})

    async def upsert(self, table: str, entity: Entity) -> Entity:
        with _translated():
            meta = await self._client(table).upsert_entity(_to_azure(entity), mode=UpdateMode.REPLACE)
        return _stored(entity, meta)

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None:
        """Deleting a missing row is a no-op (the SDK swallows the 404); a stale ETag still fails with 412."""
        with _translated():
            await self._client(table).delete_entity(partition_key, row_key, **_condition(etag))

    async def query(
        self, table: str, partition_key: str | None = None, *, row_key_from: str | None = None,
        row_key_to: str | None = None, limit: int | None = None,
    ) -> list[Entity]:
        if limit is not None and limit <= 0:
            return []  # as the memory store: the loop below checks the limit after taking a row
        clauses, params = _filter(partition_key, row_key_from, row_key_to)
        client = self._client(table)
        out: list[Entity] = []
        with _translated():
            pages = (client.query_entities(" and ".join(clauses), parameters=params, results_per_page=_PAGE)
                     if clauses else client.list_entities(results_per_page=_PAGE))
            async for found in pages:
                if out and len(out) % _PAGE == 0:
                    self.round_trips += 1  # the next page is another request
                out.append(_entity(found))
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def transact(self, table: str, ops: Sequence[Op]) -> list[Entity]:
        """One entity-group transaction, written and read by ``batch`` (ADR 0008: the SDK's own builder costs
        2.7x the CPU for one row, 5x for twenty) and sent through the table client's pipeline."""
        check_transaction(ops)
        client = self._client(table)
        account = _account(client)
        body, content_type = batch.encode(account, table, ops)
        status, headers, answer, attempts = await self._send(client, "POST", f"{account}/$batch", body,
                                                   {"Content-Type": content_type, "Accept": "application/json",
                                                    "MaxDataServiceVersion": "3.0;NetFx"})
        outcome = batch.decode(status, headers.get("Content-Type", ""), answer, len(ops))
        if isinstance(outcome, batch.Failure) and attempts > 1 and outcome.status in (409, 412):
            raise _outcome_unknown("transaction")
        if isinstance(outcome, batch.Failure):
            raise _failed(outcome)
        return [_stored(op.entity, {"etag": etag}) for op, etag in zip(ops, outcome, strict=True)]

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        for name in tables:
            try:
                with _translated():
                    self.round_trips += 1
                    await self._service.create_table(name)  # raises ResourceExistsError when present
            except EntityExists:
                pass

    async def ping(self) -> None:
        with _translated():
            self.round_trips += 1
            await self._service.get_service_properties()

    async def aclose(self) -> None:
        clients, self._tables = list(self._tables.values()), {}
        for client in clients:
            await client.close()
        await self._service.close()  # owns the shared transport: closes the aiohttp session

    @staticmethod
    async def _send(client: TableClient, method: str, url: str, body: bytes,
                    headers: dict[str, str]) -> tuple[int, Mapping[str, str], bytes, int]:
        """A request we wrote ourselves, through the table client's pipeline (signing, x-ms-date, retries,
        transport): its status, headers, body and how many attempts it took. A non-2xx answer is returned,
        not raised."""
        request = HttpRequest(method, url, content=body, headers={
            "x-ms-version": client.api_version, "DataServiceVersion": "3.0",
            "Accept": "application/json;odata=nometadata", **headers})
        # Every answer, retried ones included: azure-core's retry policy drops a streamed answer it retries
        # without closing it, and its pooled connection would then wait for the garbage collector.
        answers: list[Any] = []
        try:
            with _translated():
                # stream=True: the pipeline's decode policy would otherwise try to parse a multipart answer as JSON.
                response = await client._client.send_request(  # the generated client's raw send
                    request, stream=True, raw_response_hook=answers.append)
                return response.status_code, response.headers, await response.read(), 2 if _retried(answers) else 1
        finally:
            for answer in answers:
                await answer.http_response.close()

    def _client(self, table: str) -> TableClient:
        """The table's client (created once, reused: it shares the service's connection pool).

        Each call site makes exactly one request with it, so this is where round trips are counted.
        """
        self.round_trips += 1
        client = self._tables.get(table)
        if client is None:
            client = self._tables[table] = self._service.get_table_client(table)
        return client


def client_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIENT_OPTIONS``, the environment setting below, then the caller's ``overrides``.

    With ``use_env_settings`` (azure-core's default) the aiohttp session trusts the environment, and
    aiohttp then looks up ``~/.netrc`` and the proxy variables in a worker thread on *every* request:
    two thread hops per storage call (docs/benchmark-history.md has the cost). Only a proxy needs it, so it is on only when
    the environment names one (``HTTP(S)_PROXY``/``ALL_PROXY``, any case), and then as before.
    """
    proxied = bool(set(getproxies_environment()) - {"no"})
    return {**CLIENT_OPTIONS, "use_env_settings": proxied, **overrides}


@contextmanager
def _translated() -> Iterator[None]:
    """The one place Azure SDK errors become storage errors."""
    try:
        yield
    except ResourceModifiedError as exc:
        raise PreconditionFailed(_first_line(exc)) from exc
    except ResourceExistsError as exc:
        raise EntityExists(_first_line(exc)) from exc
    except ResourceNotFoundError as exc:
        if _code(exc) == "TableNotFound" or '"TableNotFound"' in str(exc):  # create_entity has it only in the body
            raise TableNotFound(_first_line(exc)) from exc  # a missing table is a deployment fault, not a missing row
        raise EntityNotFound(_first_line(exc)) from exc
    except (ServiceRequestError, ServiceResponseError) as exc:  # never reached it, or no answer in time
        raise StorageUnreachable(f"table storage unreachable: {type(exc).__name__}") from exc
    except AzureError as exc:
        if getattr(exc, "status_code", None) == 412:
            raise PreconditionFailed(_first_line(exc)) from exc
        raise StorageError(f"table storage failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    except (TimeoutError, OSError) as exc:
        raise StorageUnreachable(f"table storage unreachable: {type(exc).__name__}") from exc


def _code(exc: Exception) -> str:
    raw = getattr(exc, "error_code", None)
    return str(getattr(raw, "value", raw))  # a TableErrorCode enum, a plain string or None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _to_azure(entity: Entity) -> dict[str, Any]:
    check_key(entity.partition_key, "PartitionKey")
    check_key(entity.row_key, "RowKey")
    out: dict[str, Any] = {"PartitionKey": entity.partition_key, "RowKey": entity.row_key}
    for name, value in normalise_properties(entity.properties).items():
        # Every int is Edm.Int64: a counter that starts small must keep one type as it grows past 2**31.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        out[name] = EntityProperty(value, EdmType.INT64) if is_int else value
    return out


def _entity(found: Mapping[str, Any]) -> Entity:
    props = {k: (v.value if isinstance(v, EntityProperty) else v)
             for k, v in found.items() if k not in ("PartitionKey", "RowKey")}
    metadata = getattr(found, "metadata", {})
    return Entity(found["PartitionKey"], found["RowKey"], props, etag=metadata.get("etag"))


def _stored(entity: Entity, meta: Mapping[str, Any]) -> Entity:
    return Entity(entity.partition_key, entity.row_key, normalise_properties(entity.properties), etag=meta.get("etag"))


def _retried(answers: list[Any]) -> bool:
    """Whether the retry policy sent the request more than once: more than one answer came back, or the last
    one carries the history of attempts that failed without one (a lost reply). azure-core's per-call
    request hook cannot tell: it runs for the first attempt only."""
    return len(answers) > 1 or bool(answers and answers[-1].context.get("history"))


def _outcome_unknown(what: str) -> StorageUnavailable:
    """A write the SDK retried and whose retry was refused as "exists" or "changed since": the first attempt
    may have landed (its reply was lost, or the service answered 500 "may or may not have succeeded"), and
    the refusal is then our own write. Reporting it as a lost race would have the caller apply it again
    (a reservation counted twice); as unavailable, the writer-marker check decides (counter_rows.py)."""
    return StorageUnavailable(f"{what}: retried after a lost or failed reply, and the retry was refused; "
                              "outcome unknown")


def _failed(failure: batch.Failure) -> StorageError:
    """A refused transaction as the store's error: which operation and why, or why the batch as a whole."""
    if failure.index is None or failure.code == "TableNotFound":  # the table, not an operation: as the SDK says
        return _refused(failure.status, failure.code, failure.message)
    reason: Literal["exists", "precondition", "not_found", "other"] = _REASONS.get(failure.code, "other")
    return TransactionFailed(f"{failure.index}: {failure.code}", index=failure.index, reason=reason)


def _refused(status: int, code: str, message: str) -> StorageError:
    """An error answer to a request we wrote (a single-entity call, or a batch refused as a whole) as the
    store's error: the mapping ``_translated`` gives the SDK's exceptions."""
    what = f"{status} {code or 'no error code'}: {message.splitlines()[0] if message else ''}"
    if status == 412:
        return PreconditionFailed(what)
    if status == 404:
        return TableNotFound(what) if code == "TableNotFound" else EntityNotFound(what)
    if status in (408, 500, 502, 503, 504):  # after the pipeline's own retries
        return StorageUnavailable(f"table storage failed: {what}")
    return StorageError(f"table storage refused the request: {what}")


def _account(client: TableClient) -> str:
    return client.url.split("?", 1)[0].rstrip("/")


def _condition(etag: str | None) -> dict[str, Any]:
    if etag is None or etag == "*":
        return {}
    return {"etag": etag, "match_condition": MatchConditions.IfNotModified}


def _filter(pk: str | None, rk_from: str | None, rk_to: str | None) -> tuple[list[str], dict[str, str]]:
    clauses, params = [], {}
    for clause, name, value in (("PartitionKey eq @pk", "pk", pk), ("RowKey ge @rkf", "rkf", rk_from),
                                ("RowKey lt @rkt", "rkt", rk_to)):
        if value is not None:
            clauses.append(clause)
            params[name] = value
    return clauses, params

"""Reserve → settle for one request, exactly once, and the record it leaves behind.

``Accounting`` owns a request's reservation. ``finish`` / ``finish_error`` settle or
release it, write the request's single cost row (same transaction as the counters)
and emit the request's one telemetry record. A second call is a no-op, so the
streaming path can call it from a ``finally`` without double counting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway_lib.auth.identity import Caller
from gateway_lib.billing import pricing, settlements
from gateway_lib.billing.ledger import CostRow
from gateway_lib.config.catalog import Target
from gateway_lib.errors import GatewayError, ProviderError
from gateway_lib.guardrails import tokens
from gateway_lib.http.edge import Scope
from gateway_lib.providers.base import OperationRequest, Usage
from gateway_lib.shielded import Shielded
from gateway_lib.storage import circuit
from gateway_lib.storage.base import StorageError
from gateway_lib.telemetry import RequestRecord

if TYPE_CHECKING:
    from gateway_lib.guardrails.screen import Screened
    from gateway_lib.quota.admission import Reservation
    from gateway_lib.routing.fallback import Attempt
    from gateway_lib.routing.plan import RoutePlan
    from gateway_lib.runtime import Runtime

log = logging.getLogger("gateway.accounting")


@dataclass
class Accounting:
    rt: Runtime
    scope: Scope
    caller: Caller
    request: OperationRequest
    alias: str
    task: str | None
    plan: RoutePlan
    screened: Screened
    attempts: list[Attempt] = field(default_factory=list)
    served_by: Target | None = None
    reservation: Reservation | None = None
    estimated_usd: Decimal = Decimal(0)
    _finished: bool = False

    async def reserve(self) -> None:
        """Reserve USD at the worst case: the prompt estimate plus max_tokens for every choice, priced at the
        dearest candidate target (fallback may land on any of them). Tokens count the prompt plus the output
        the caller's answers are expected to use (quota/expected.py): a burst of short answers is no breach."""
        s, choices = self.screened, self._choices
        self.estimated_usd = max(pricing.estimate(t.price, s.prompt_tokens, s.max_tokens * choices)
                                 for t in self.plan.targets)
        expected = self.rt.admission.expected_output.tokens(self.caller.key, s.max_tokens) * choices
        self.reservation = await self.rt.admission.reserve(
            self.caller, tokens=s.prompt_tokens + expected, usd=self.estimated_usd,
            request_id=self.scope.request_id,
        )

    @property
    def _choices(self) -> int:
        return int(getattr(self.request, "choices", 1))

    def response_headers(self, target: Target) -> dict[str, str]:
        self.served_by = target
        headers = {"x-gateway-provider": target.provider, "x-gateway-model": target.model,
                   "x-gateway-target": target.id}
        if self.screened.clamped:
            headers["x-gateway-max-tokens-clamped"] = str(self.screened.max_tokens)
        return headers | (self.reservation.headers if self.reservation else {})

    def estimate_usage(self, target: Target | None, text: str) -> Usage:
        """Usage the upstream did not report (a stream cut or abandoned before its usage event, an answer
        without ``usage``): the prompt estimate plus what was answered, counted with the target's tokenizer."""
        if target is None:
            return Usage(self.screened.prompt_tokens, tokens.count_text(text, "o200k_base"))
        return Usage(self.screened.prompt_tokens_for(target.tokenizer), tokens.count_text(text, target.tokenizer))

    def capped_usage(self, target: Target) -> Usage:
        """The most the request can have used on ``target``: its prompt and every choice at the output cap."""
        return Usage(self.screened.prompt_tokens_for(target.tokenizer), self.screened.max_tokens * self._choices)

    async def finish(self, target: Target | None, usage: Usage, *, status: str,
                     error: GatewayError | None = None) -> Decimal:
        """Settle to the actual usage; returns the request's cost. Runs to the end even if the request is
        cancelled meanwhile (the caller hung up, the host timed it out): a settle cut short would leave the
        reservation in flight and the request without its cost row."""
        if self._finished:
            return Decimal(0)
        self._finished = True
        if status == "ok" and self.screened.max_tokens:  # an answer of an operation with output: learn its length
            self.rt.admission.expected_output.observe(self.caller.key, usage.completion_tokens / self._choices)
        cost = pricing.cost(target.price, usage.prompt_tokens, usage.completion_tokens) if target else Decimal(0)
        usage, cost = self._with_failed_attempts(usage, cost)
        assert self.reservation is not None  # the pipeline reserves before any path can finish
        row = self._row(target, usage, cost, status, error)
        if self.rt.admission.settle_now(self.reservation, row) is not None:  # written behind: nothing to wait for
            self._record(target, usage, cost, status, error)
            return cost
        settling = Shielded(self._settle(row, target, usage, cost, status, error))
        # The answer is paid for already: it waits for its settle only so long (a settle riding out an outage,
        # or queued behind others for the row, goes on in the background).
        if not await settlements.within(settling, circuit.REQUEST_SECONDS):
            log.warning("settle still under way; the response does not wait for it",
                        extra={"custom_dimensions": {"request_id": self.scope.request_id, "status": status}})
        return cost

    def _with_failed_attempts(self, usage: Usage, cost: Decimal) -> tuple[Usage, Decimal]:
        """Usage and cost plus what failed attempts were billed for anyway (a fan-out some of whose calls
        answered before one failed), each at its own target's price: the row says what the request cost."""
        for attempt in self.attempts:
            prompt, completion = attempt.consumed
            if prompt or completion:
                usage = Usage(usage.prompt_tokens + prompt, usage.completion_tokens + completion)
                failed = next((t for t in self.plan.targets if t.id == attempt.target_id), None)
                cost += pricing.cost(failed.price, prompt, completion) if failed else Decimal(0)
        return usage, cost

    async def _settle(self, row: CostRow, target: Target | None, usage: Usage, cost: Decimal, status: str,
                      error: GatewayError | None) -> None:
        assert self.reservation is not None
        try:
            # Settle and release are one operation: swap the reservation for what the row says was used.
            await self.rt.admission.settle(self.reservation, row)
        except StorageError:
            # The reservation (an over-estimate) stays on the counters: conservative, never lost spend.
            log.error("settle failed; reservation left in place",
                      extra={"custom_dimensions": {"request_id": self.scope.request_id, "status": status}})
        self._record(target, usage, cost, status, error)

    async def finish_error(self, error: GatewayError) -> None:
        """Release the reservation of a request that produced nothing; its cost row says why."""
        if not self._finished and error.attempts:
            self.attempts = list(error.attempts)
        await self.finish(None, Usage(0, 0), status="error", error=error)

    def _row(self, target: Target | None, usage: Usage, cost: Decimal, status: str,
             error: GatewayError | None) -> CostRow:
        c, s = self.caller, self.screened
        where = target or self._last_sent_to()  # an error row still says which provider refused it
        return CostRow(
            request_id=self.scope.request_id, time=datetime.now(UTC), caller_key=c.key, app_id=c.app_id,
            user_id=c.user_id, tenant_id=c.tenant_id, team=c.team, label=self.scope.label, route=self.scope.route,
            task=self.task, alias=self.alias, provider=where.provider if where else None,
            model=where.model if where else None, deployment=where.deployment if where else None,
            region=where.region if where else None, prompt_tokens_estimated=s.prompt_tokens,
            completion_tokens_estimated=s.max_tokens, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, cost_usd=cost,
            price_version=self.rt.settings.catalogue.version, latency_ms=round(self.scope.elapsed_ms(), 1),
            status=status, http_status=error.status if error else 200, attempts=len(self.attempts),
            error_code=error.code if error else None,
        )

    def _last_sent_to(self) -> Target | None:
        """The target of the last attempt the request was sent to."""
        sent = [a.target_id for a in self.attempts if a.sent]
        return next((t for t in self.plan.targets if sent and t.id == sent[-1]), None)

    def _record(self, target: Target | None, usage: Usage, cost: Decimal, status: str,
                error: GatewayError | None) -> None:
        c = self.caller
        record = RequestRecord(
            request_id=self.scope.request_id, trace_id=self.scope.trace_id, caller_app=c.app_id,
            caller_user=c.user_id, tenant=c.tenant_id,
            team=c.team, tier=c.tier.name, route=self.scope.route, task=self.task, model=self.alias,
            provider=target.provider if target else None, target_model=target.model if target else None,
            deployment=target.deployment if target else None, region=target.region if target else None,
            attempts=[a.as_dict() for a in self.attempts], status=error.status if error else 200,
            outcome=status, error_code=error.code if error else None,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cost_usd=str(cost),
            latency_ms=round(self.scope.elapsed_ms(), 2), upstream_ms=round(self.scope.upstream_ms, 2),
            overhead_ms=round(self.scope.overhead_ms(), 2), stream=self.request.stream,
            fallbacks=max(0, len(self.attempts) - 1),
            upstream_error=isinstance(error, ProviderError),
        )
        self.scope.recorded = True
        self.rt.telemetry.request(record)

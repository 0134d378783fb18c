"""The flow of one call: gates, semaphore, attempts with retries, and the terminal event.

A :class:`~pipeline.BaseLLMService` composes one ``CallFlow`` from its parts (gates, semaphore,
provider, retry policy, meter, usage); the flow holds no state of its own between calls. The
events' payloads are built by pipeline/_payloads.py, the gate-facing steps of an attempt live in
pipeline/_gate_steps.py.

Invariants:
- ``completed`` is always the last event of a call, and always emitted: on success, provider
  failure, validation failure, an exception in our own code, and cancellation (which is then
  re-raised, never swallowed).
- Every HTTP attempt holds an RPM slot; a reservation the provider never counted is returned
  with an ``unmarked`` event. The semaphore permit is released in ``finally``.
- An attempt's slots end their windows one window after the earliest bound on its arrival:
  ``body_sent + arrival_guard_s`` once the transport reports the body written
  (``mark_arrived``), else the answer (``mark_done``), or ``unanswered_guard_s`` after the end
  of an attempt that got no answer.
- A streamed call (``state.stream``, driven by pipeline/_stream.py) takes the same steps; its
  attempt ends when the stream's headers arrive (its answer) and keeps the permit
  (``state.holding``) until the stream ends, when ``received`` is emitted.
- Write-ahead (``CallStream.store`` set): an attempt leaves only once its ``sent`` is
  committed, and the result returns (or the cancellation goes on) only once ``completed`` is.
  A store that cannot commit ``sent`` within ``store_timeout_s`` fails the call with
  ``store_unavailable`` before anything is sent: the attempt's ``sent`` is then followed by an
  ``attempt_failed`` with that error type, which says it never left.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from llmtrail._log import get_logger

from ._call import CallState, CallStream, estimate_input_tokens, plain_traceback
from ._errors import ErrorType
from ._events import (
    EventType,
    Outcome,
    StreamedFields,
)
from ._gate_steps import AnyGate, give_back, hold_for, mark_arrived, observe_headers
from ._gates import (
    DEFAULT_ARRIVAL_GUARD_S,
    GRANT_LEAD_S,
    GateRequestTooLarge,
)
from ._payloads import attempt_failed, completed, gate_wait, received, trace_created, unmarked
from ._pricing import PriceTable
from ._provider_types import ProviderError, ProviderResponse
from ._redact import redact_text
from ._redis_gates import RateLimitBackendUnavailable
from ._retry import RetryPolicy
from ._semaphore import FairSemaphore
from ._send_time import reset_body_sent_callback, set_body_sent_callback
from ._stats import OperationUsage, RateMeter
from ._types import GenerationRequest, GenerationResult, Timings, Usage, coerce_request
from .typing import Clock, Provider

__all__ = ["AnyGate", "CallFlow"]

# What the service holds: the in-process gate or the shared one (the same methods).

_log = get_logger(__name__)


class CallFlow:
    """The request path of one call: the parts a service composes, and the steps of a call.

    The service builds one and hands it every call (:meth:`run`); the flow holds no state of
    its own between calls beyond the shared parts (gates, semaphore, meter, usage).
    """

    def __init__(
        self,
        *,
        model: str,
        request_timeout_s: float,
        capture_content: bool,
        default_max_output_tokens: int,
        prices: PriceTable,
        clock: Clock,
        rpm: AnyGate | None,
        tpm: AnyGate | None,
        semaphore: FairSemaphore,
        provider: Provider,
        retry: RetryPolicy,
        meter: RateMeter,
        usage: dict[str, OperationUsage],
        limits: dict[str, Any],
        unanswered_guard_s: float,
        trace_http: bool,
        resource: dict[str, str] | None,
        arrival_guard_s: float = DEFAULT_ARRIVAL_GUARD_S,
    ) -> None:
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.capture_content = capture_content
        self.default_max_output_tokens = default_max_output_tokens
        self.prices = prices
        self._clock = clock
        self._rpm = rpm
        self._tpm = tpm
        self._semaphore = semaphore
        self._provider = provider
        self._retry = retry
        self._meter = meter
        self._usage = usage
        self._limits = limits
        self._unanswered_guard_s = unanswered_guard_s
        self._trace_http = trace_http  # a sink wants an HTTP span per attempt
        self._resource = resource  # the spans' service name, version and instance, if traced
        self._arrival_guard_s = arrival_guard_s
        self._hook_seen = False  # the send-time hook reported a write: gates may grant ahead

    async def run(
        self,
        call: CallStream,
        request: Any,
        operation_name: str | None,
        parent: otel_trace.SpanContext,
    ) -> GenerationResult:
        """One call, start to ``completed``; never raises but for cancellation."""
        try:
            result = await self._guarded(call, request, operation_name, parent)
        except asyncio.CancelledError:
            await call.settle()  # the `completed` (cancelled) is committed before it goes on
            raise
        await call.settle()  # write-ahead: the `completed` is committed before the result
        return result

    def refuse(
        self, call: CallStream, request: Any, operation_name: str | None, message: str
    ) -> GenerationResult:
        """A call refused before it started because the event store cannot take events:
        ``store_unavailable``, never sent."""
        op = operation_name or getattr(request, "operation_name", None) or "generation"
        model = getattr(request, "model", None) or self.model
        request_id = getattr(request, "request_id", None)
        error_type = ErrorType.STORE_UNAVAILABLE
        return self._fail_early(call, op, model, request_id, error_type, message, self._clock.now())

    async def _guarded(
        self,
        call: CallStream,
        request: Any,
        operation_name: str | None,
        parent: otel_trace.SpanContext,
    ) -> GenerationResult:
        clock = self._clock
        t0 = clock.now()
        state = CallState()
        if not isinstance(request, GenerationRequest):
            try:
                request = coerce_request(request)
            except (TypeError, ValueError) as exc:
                op = operation_name or "generation"
                return self._fail_early(
                    call, op, self.model, None, ErrorType.VALIDATION, str(exc), t0
                )
        op = operation_name or request.operation_name or "generation"
        model = request.model or self.model
        try:
            return await self._run(call, state, request, op, model, parent, t0)
        except asyncio.CancelledError:
            self._cancelled(call, state, request, op, model, t0)
            raise
        except Exception as exc:  # a bug of ours: report it as a result, never leak slots
            # The traceback without local variables: a renderer that shows locals would
            # print the prompt, whatever capture_content says.
            _log.error(
                "llmtrail internal error", error=repr(exc)[:500], traceback=plain_traceback()
            )
            message = f"internal error in llmtrail: {exc!r}"
            return self._fail(call, state, request, op, model, ErrorType.INTERNAL, message, t0)

    def _cancelled(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest,
        op: str,
        model: str,
        t0: float,
    ) -> None:
        """Give back what the provider never counted; complete the call as cancelled."""
        give_back(self._rpm, self._tpm, call, state, "cancelled")
        self._complete(
            call,
            state,
            request,
            op,
            model,
            None,
            ErrorType.CANCELLED,
            "the call was cancelled by its caller",
            t0,
            Outcome.CANCELLED,
        )

    def _fail_early(
        self,
        call: CallStream,
        op: str,
        model: str,
        request_id: str | None,
        error_type: ErrorType,
        message: str,
        t0: float,
    ) -> GenerationResult:
        created = trace_created(self._provider, self._resource, op, model, request_id=request_id)
        call.emit(EventType.TRACE_CREATED, created)
        return self._complete(
            call, CallState(), None, op, model, None, error_type, message, t0, Outcome.FAILED
        )

    async def _run(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest,
        op: str,
        model: str,
        parent: otel_trace.SpanContext,
        t0: float,
    ) -> GenerationResult:
        response = await self._answer(call, state, request, op, model, parent, t0)
        if isinstance(response, GenerationResult):
            return response
        tpm = self._tpm
        max_out = request.max_output_tokens
        if state.tpm_res is not None and tpm is not None:
            # The provider's TPM counts real input plus max_output_tokens when given.
            counted = response.input_tokens + (max_out or response.output_tokens)
            tpm.reconcile(state.tpm_res, counted)
        return self._complete(
            call, state, request, op, model, response, None, None, t0, Outcome.SUCCEEDED
        )

    async def _answer(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest,
        op: str,
        model: str,
        parent: otel_trace.SpanContext,
        t0: float,
    ) -> Any:
        """The gates, then attempts: the last attempt's answer (a ProviderResponse, or the
        open ProviderStream of a streamed call), or the call's failed result."""
        failed = await self._admit(call, state, request, op, model, parent, t0)
        if failed is not None:
            return failed
        try:
            return await self._attempts(call, state, request, model)
        except ProviderError as exc:
            # Slots of attempts that never reached the provider go back; the rest stay counted.
            reason = "not_sent" if state.reached else "connection_refused"
            return self._fail(
                call, state, request, op, model, exc.error_type, exc.message, t0, reason
            )
        except RateLimitBackendUnavailable as exc:  # a retry's RPM slot could not be had
            error_type = ErrorType.LIMITER_UNAVAILABLE
            return self._fail(call, state, request, op, model, error_type, str(exc), t0)

    async def _admit(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest,
        op: str,
        model: str,
        parent: otel_trace.SpanContext,
        t0: float,
    ) -> GenerationResult | None:
        """``trace_created`` and both gates; a failed result when a gate refused the call."""
        now = t0
        est_input = estimate_input_tokens(request)
        max_out = request.max_output_tokens
        reserve = est_input + (max_out or self.default_max_output_tokens)
        rpm_now = state.rpm_now = self._meter.rpm(now)
        tpm_now = state.tpm_now = self._meter.tpm(now)
        created = trace_created(
            self._provider,
            self._resource,
            op,
            model,
            request,
            capture_content=self.capture_content,
            limits=self._limits,
            stream=state.stream,
            estimated_input_tokens=est_input,
            reserved_tokens=reserve,
            rpm_at_start=rpm_now,
            tpm_at_start=tpm_now,
            parent_span_id=f"{parent.span_id:016x}" if parent.is_valid else None,
        )
        call.emit(EventType.TRACE_CREATED, created)

        rpm, tpm = self._rpm, self._tpm
        try:
            if rpm is not None:
                state.rpm_res = await rpm.acquire(1)
                state.rpm_wait = state.rpm_res.waited_s
            call.emit(EventType.GATE_WAIT, gate_wait("rpm", 1, 1, state.rpm_wait, state.rpm_res))
            if tpm is not None:
                state.tpm_res = await tpm.acquire(reserve)
                state.tpm_wait = state.tpm_res.waited_s
            call.emit(
                EventType.GATE_WAIT, gate_wait("tpm", 1, reserve, state.tpm_wait, state.tpm_res)
            )
        except GateRequestTooLarge as exc:
            return self._fail(call, state, request, op, model, ErrorType.TOO_LARGE, str(exc), t0)
        except RateLimitBackendUnavailable as exc:
            error_type = ErrorType.LIMITER_UNAVAILABLE
            return self._fail(call, state, request, op, model, error_type, str(exc), t0)
        return None

    def _fail(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest,
        op: str,
        model: str,
        error_type: ErrorType,
        message: str,
        t0: float,
        reason: str = "not_sent",
    ) -> GenerationResult:
        """Return what the provider never counted, then complete the call as failed."""
        give_back(self._rpm, self._tpm, call, state, reason)
        return self._complete(
            call, state, request, op, model, None, error_type, message, t0, Outcome.FAILED
        )

    async def _attempts(
        self, call: CallStream, state: CallState, request: GenerationRequest, model: str
    ) -> ProviderResponse:
        def before_sleep(retry_state: Any) -> None:
            outcome = retry_state.outcome
            exc = outcome.exception() if outcome is not None else None
            call.emit(
                EventType.RETRY_SCHEDULED,
                {
                    "attempt": retry_state.attempt_number,
                    "next_attempt": retry_state.attempt_number + 1,
                    "wait_s": retry_state.upcoming_sleep,
                    "reason": str(getattr(exc, "error_type", "unknown")),
                    "retry_after_s": getattr(exc, "retry_after_s", None),
                },
            )
            _log.info(
                "retrying",
                attempt=retry_state.attempt_number,
                error_type=str(getattr(exc, "error_type", "")),
                wait_s=round(retry_state.upcoming_sleep, 3),
            )

        retrying = self._retry.retrying(sleep=self._clock.sleep, before_sleep=before_sleep)
        async for attempt in retrying:
            with attempt:
                return await self._attempt(
                    call, state, request, model, attempt.retry_state.attempt_number
                )
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _attempt(
        self, call: CallStream, state: CallState, request: GenerationRequest, model: str, n: int
    ) -> ProviderResponse:
        clock = self._clock
        rpm = self._rpm
        if n > 1:
            waited = 0.0
            if rpm is not None:
                state.rpm_res = await rpm.acquire(1)
                waited = state.rpm_res.waited_s
                state.rpm_wait += waited
            call.emit(EventType.GATE_WAIT, gate_wait("rpm", n, 1, waited, state.rpm_res))
        # The permit is taken per attempt, after the attempt's RPM slot, and never held while
        # waiting at a gate or in a retry's backoff: a retry that waited for an RPM slot while
        # holding a permit could deadlock against calls holding (pending) slots while queued
        # for a permit. Gates first, then the semaphore, for every attempt.
        sem = self._semaphore
        sem_start = clock.now()
        ahead = await sem.acquire()
        try:
            waited = clock.now() - sem_start
            state.sem_wait += waited
            call.emit(
                EventType.SEMAPHORE_ACQUIRED,
                {
                    "attempt": n,
                    "waited_s": waited,
                    "in_flight": sem.in_flight(),
                    "waiters_ahead": ahead,
                },
            )
            return await self._send(call, state, request, model, n)
        finally:
            if not state.holding:  # an opened stream keeps its permit until it ends
                sem.release()

    async def _send(
        self, call: CallStream, state: CallState, request: GenerationRequest, model: str, n: int
    ) -> ProviderResponse:
        """One HTTP attempt, holding its RPM slot and a semaphore permit."""
        clock = self._clock
        rpm, tpm = self._rpm, self._tpm
        call.emit(EventType.SENT, {"attempt": n})
        await call.sent_durable(n)  # write-ahead: raises ProviderError if not committed
        state.attempts = n  # requests that left: a refused `sent` is not one
        sent_at = clock.now()
        if state.rpm_res is not None and rpm is not None:
            rpm.mark_sent(state.rpm_res)
        if state.tpm_res is not None and tpm is not None:
            tpm.mark_sent(state.tpm_res)
        self._meter.on_send(sent_at)
        answered = False
        state.body_sent_s = state.first_byte_s = None  # this attempt's, from the send-time hook

        def on_body_sent() -> None:
            # The body is written: the request reaches the provider within the guard.
            now = clock.now()
            state.body_sent_s = now - sent_at
            if not self._hook_seen:  # it holds requests too: gates may grant ahead now
                self._hook_seen = True
                for gate in (rpm, tpm):
                    if gate is not None:
                        gate.lead_s = GRANT_LEAD_S
            mark_arrived(self._rpm, self._tpm, state, now + self._arrival_guard_s)

        def on_headers() -> None:  # the answer's headers were read: the provider's part ends
            state.first_byte_s = clock.now() - sent_at

        send_trace = set_body_sent_callback(on_body_sent, hold_for(self._clock, state), on_headers)
        # The HTTP span (the httpx instrumentation's) nests under the attempt's span.
        token = call.enter_attempt_span(n) if self._trace_http else None
        try:
            invoke: Any = self._provider.open_stream if state.stream else self._provider.invoke
            response: ProviderResponse = await invoke(
                request,
                model=model,
                timeout_s=self.request_timeout_s,
                client_request_id=f"{call.call_id}:{n}",
            )
        except ProviderError as exc:
            state.latency = clock.now() - sent_at
            answered = exc.status is not None
            if exc.reached_provider:
                state.reached = True
            call.emit(
                EventType.ATTEMPT_FAILED,
                attempt_failed(
                    n,
                    state.latency,
                    exc.error_type,
                    exc.message,
                    status=exc.status,
                    retryable=exc.retryable and self._retry.should_retry(exc),
                    retry_after_s=exc.retry_after_s,
                    provider_code=exc.provider_code,
                    provider_request_id=exc.provider_request_id,
                    rate_limits=exc.rate_limits,
                    body_sent_s=state.body_sent_s,
                    first_byte_s=state.first_byte_s,
                ),
            )
            observe_headers(self._rpm, self._tpm, exc.rate_limits, sent_at)
            if not exc.reached_provider and state.rpm_res is not None and rpm is not None:
                rpm.release(state.rpm_res)
                call.emit(EventType.UNMARKED, unmarked("rpm", n, 1, "connection_refused"))
            raise
        except asyncio.CancelledError:
            state.latency = clock.now() - sent_at
            state.reached = True  # it may have arrived: keep its slots, conservatively
            call.emit(
                EventType.ATTEMPT_FAILED,
                attempt_failed(
                    n,
                    state.latency,
                    ErrorType.CANCELLED,
                    "cancelled while in flight",
                    body_sent_s=state.body_sent_s,
                    first_byte_s=state.first_byte_s,
                ),
            )
            raise
        else:
            answered = True
        finally:
            # An answer proves the request arrived: its window can end at now + window.
            # Without one (timeout, dropped, cancelled) it may still arrive: add a guard.
            guard = 0.0 if answered else self._unanswered_guard_s
            if state.rpm_res is not None and rpm is not None:
                rpm.mark_done(state.rpm_res, unanswered_guard_s=guard)
            if state.tpm_res is not None and tpm is not None:
                tpm.mark_done(state.tpm_res, unanswered_guard_s=guard)
            if token is not None:
                otel_context.detach(token)
            reset_body_sent_callback(send_trace)
        state.reached = True
        state.latency = clock.now() - sent_at
        if state.stream:  # opened: `received` is emitted when the stream ends (_stream.py)
            state.holding = True
            state.sent_at = sent_at
            observe_headers(self._rpm, self._tpm, response.rate_limits, sent_at)
            return response
        self._received(call, model, n, state.latency, response, state)
        observe_headers(self._rpm, self._tpm, response.rate_limits, sent_at)
        return response

    def _received(
        self,
        call: CallStream,
        model: str,
        n: int,
        latency: float,
        response: ProviderResponse,
        state: CallState,
        extra: StreamedFields | None = None,
    ) -> None:
        """Emit ``received`` for the answer of attempt ``n`` (``extra``: a stream's fields)."""
        cost = self.prices.answer_cost(model, response)
        sent, first = state.body_sent_s, state.first_byte_s
        payload = received(n, latency, response, cost, sent, first, extra, self.capture_content)
        call.emit(EventType.RECEIVED, payload)

    def _complete(
        self,
        call: CallStream,
        state: CallState,
        request: GenerationRequest | None,
        op: str,
        model: str,
        response: ProviderResponse | None,
        error_type: ErrorType | None,
        message: str | None,
        t0: float,
        outcome: Outcome,
    ) -> GenerationResult:
        total = self._clock.now() - t0
        # Error text comes from the provider (or an exception's repr): secrets stop here.
        message = redact_text(message) if message else message
        usage = Usage()
        cost: Decimal | None = None
        if response is not None:
            cost = self.prices.answer_cost(model, response)
            usage = Usage(
                response.input_tokens,
                response.cached_tokens,
                response.output_tokens,
                response.reasoning_tokens,
                cost,
            )
            self._meter.on_tokens(self._clock.now(), usage.total_tokens)
        call.emit(
            EventType.COMPLETED,
            completed(outcome, error_type, message, state, usage, model, response, total),
        )
        result = GenerationResult(
            success=outcome is Outcome.SUCCEEDED,
            call_id=call.call_id,
            trace_id=call.trace_id,
            operation_name=op,
            model=model,
            request_id=request.request_id if request is not None else None,
            content=response.content if response else None,
            raw_content=response.raw_content if response else None,
            response_id=response.response_id if response else None,
            usage=usage,
            error_type=error_type,
            error_message=message,
            attempts=state.attempts,
            timings=Timings(state.rpm_wait, state.tpm_wait, state.sem_wait, state.latency, total),
            rpm_at_start=state.rpm_now,
            tpm_at_start=state.tpm_now,
        )
        if outcome is not Outcome.CANCELLED:
            totals = self._usage.get(op)
            if totals is None:
                totals = self._usage[op] = OperationUsage()
            totals.add(result)
        else:
            self._usage.setdefault(op, OperationUsage()).add(result, cancelled=True)
        if error_type is not None and outcome is Outcome.FAILED:
            _log.warning(
                "llm call failed", operation=op, error_type=str(error_type), attempts=state.attempts
            )
        return result

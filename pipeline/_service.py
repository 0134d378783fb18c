"""``BaseLLMService``: the request path of one call, and the composition of its parts.

The flow of one call (DESIGN.md, with the seed's flaws fixed):
``trace_created`` -> RPM gate (reserve 1) -> ``gate_wait(rpm)`` -> TPM gate (reserve the
estimate) -> ``gate_wait(tpm)`` -> semaphore -> ``semaphore_acquired`` -> for each attempt:
[RPM gate again for retries] ``sent`` -> provider -> ``received`` | ``attempt_failed`` ->
``retry_scheduled`` -> ... -> reconciliation -> ``completed``.

Invariants:
- ``completed`` is always the last event of a call, and always emitted: on success, provider
  failure, validation failure, an exception in our own code, and cancellation (which is then
  re-raised, never swallowed).
- Events are emitted synchronously (``EventSink.emit`` never blocks), so a second cancellation
  cannot interrupt the terminal events; backpressure is applied at admission, before
  ``trace_created``.
- Every HTTP attempt holds an RPM slot whose window starts when it is sent. A reservation the
  provider never counted is returned with an ``unmarked`` event.
- The semaphore permit is released in ``finally``; gates clean up cancelled waiters themselves.
- One event loop owns the gates. The sync ``execute_generation`` runs the same coroutine on that
  loop from any thread (a private loop thread when the service is used synchronously only), so
  gates, semaphore, metrics and the store are literally shared.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import os
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from ._clock import LoopClock
from ._errors import ConfigurationError, ErrorType, ServiceClosedError
from ._events import Event, EventType, Outcome, child_span_id, default_instance
from ._gates import GateRequestTooLarge, GateReservation, SlidingWindowGate, parse_reset
from ._pricing import PriceTable
from ._provider import OpenAIResponsesProvider
from ._retry import RetryPolicy
from ._semaphore import FairSemaphore
from ._stats import OperationUsage, RateMeter, ServiceStats
from ._types import GenerationRequest, GenerationResult, Timings, Usage
from .typing import Clock, EventSink, Provider, ProviderError, ProviderResponse, UsageHistory

__all__ = ["BaseLLMService", "estimate_input_tokens"]

_log = structlog.get_logger("llmtrail")
_DEFAULT_STORE = "sqlite+aiosqlite:///llmtrail.db"
_UNSET: Any = object()
_SAMPLED = otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED)


def estimate_input_tokens(request: GenerationRequest) -> int:
    """Input tokens before the call: ceil(characters / 4) per message, plus 4 per message.

    About four characters per token is the usual figure for English with OpenAI's
    tokenizers; the per-message overhead covers role markers. The estimate only sizes the TPM
    reservation: it is reconciled with the provider's real count after the call.
    """
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in request.messages())


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer; fix or unset it") from None


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{name}={value!r} is invalid: use an int >= 1, or None for no limit"
        )
    return value


def _load_plugin(name: str) -> Callable[..., Any] | None:
    for entry in importlib.metadata.entry_points(group="llmtrail.sinks"):
        if entry.name == name:
            loaded: Callable[..., Any] = entry.load()
            return loaded
    return None


class _Call:
    """One call's identity and its event stream."""

    __slots__ = (
        "call_id",
        "trace_id",
        "span_id",
        "seq",
        "sinks",
        "instance",
        "backlog",
        "trace_flags",
    )

    def __init__(
        self,
        sinks: Sequence[EventSink],
        instance: str,
        parent_trace: int | None,
        backlog: set[EventSink],
    ) -> None:
        self.call_id = os.urandom(16).hex()
        self.trace_id = f"{parent_trace or random.getrandbits(128) or 1:032x}"
        self.span_id = f"{random.getrandbits(64) or 1:016x}"
        self.seq = 0
        self.sinks = sinks
        self.instance = instance
        self.backlog = backlog
        # A caller's unsampled trace stays unsampled, so no orphan HTTP span is exported.
        self.trace_flags = _SAMPLED

    def emit(self, type_: EventType, payload: dict[str, Any]) -> None:
        event = Event(
            self.call_id,
            self.seq,
            type_,
            datetime.now(UTC),
            self.trace_id,
            self.span_id,
            payload,
            self.instance,
        )
        self.seq += 1
        for sink in self.sinks:
            try:
                if sink.emit(event) is False:
                    self.backlog.add(sink)  # at its high-water mark: the next call waits
            except Exception:  # a broken sink must not break the call; it is reported
                _log.exception("event sink failed", sink=type(sink).__name__, event_type=str(type_))


class _State:
    """What a call holds at any instant, so cleanup knows what to give back."""

    __slots__ = (
        "rpm_res",
        "tpm_res",
        "rpm_wait",
        "tpm_wait",
        "sem_wait",
        "attempts",
        "reached",
        "latency",
        "rpm_now",
        "tpm_now",
    )

    def __init__(self) -> None:
        self.rpm_res: GateReservation | None = None
        self.tpm_res: GateReservation | None = None
        self.rpm_wait = 0.0
        self.tpm_wait = 0.0
        self.sem_wait = 0.0
        self.attempts = 0
        self.reached = False
        self.latency = 0.0
        self.rpm_now = 0
        self.tpm_now = 0


class BaseLLMService:
    """Rate-aware, observable LLM calls. Subclass it to add business methods.

    Configuration: constructor arguments first, then ``LLMTRAIL_*`` environment variables
    (``LLMTRAIL_MAX_RPM``, ``LLMTRAIL_MAX_TPM``, ``LLMTRAIL_MAX_CONCURRENT``,
    ``LLMTRAIL_STORE_URL``); the SDK reads ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``.
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        *,
        max_rpm: int | None = _UNSET,
        max_tpm: int | None = _UNSET,
        max_concurrent_requests: int = _UNSET,
        rpm_window_seconds: float = 60.0,
        max_attempts: int = 3,
        request_timeout_s: float = 60.0,
        base_url: str | None = None,
        api_key: str | None = None,
        provider: Provider | None = None,
        store_url: str | None = _UNSET,
        sinks: Iterable[EventSink] = (),
        tracing: bool | None = None,
        capture_content: bool = False,
        price_table: PriceTable | None = None,
        clock: Clock | None = None,
        instance: str | None = None,
        default_max_output_tokens: int = 1024,
        send_guard_s: float | None = None,
        unanswered_guard_s: float = 1.0,
        retry_backoff_base_s: float = 0.5,
        retry_backoff_max_s: float = 20.0,
        max_retry_wait_s: float = 60.0,
        max_event_queue: int = 10_000,
        warm_start: bool = True,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigurationError(
                f"model={model!r} is invalid: name a model, e.g. 'gpt-4o-mini'"
            )
        self.model = model
        self.max_rpm = _check_limit(
            "max_rpm", _env_int("LLMTRAIL_MAX_RPM") if max_rpm is _UNSET else max_rpm
        )
        self.max_tpm = _check_limit(
            "max_tpm", _env_int("LLMTRAIL_MAX_TPM") if max_tpm is _UNSET else max_tpm
        )
        if max_concurrent_requests is _UNSET:
            max_concurrent_requests = _env_int("LLMTRAIL_MAX_CONCURRENT") or 100
        if not isinstance(rpm_window_seconds, int | float) or not rpm_window_seconds > 0:
            raise ConfigurationError(
                f"rpm_window_seconds={rpm_window_seconds!r} is invalid: use a number of seconds > 0"
            )
        if not isinstance(request_timeout_s, int | float) or not request_timeout_s > 0:
            raise ConfigurationError(
                f"request_timeout_s={request_timeout_s!r} is invalid: use a number of seconds > 0"
            )
        if default_max_output_tokens < 1:
            raise ConfigurationError("default_max_output_tokens must be >= 1")
        self.rpm_window_seconds = float(rpm_window_seconds)
        self.request_timeout_s = float(request_timeout_s)
        self.capture_content = capture_content
        self.default_max_output_tokens = default_max_output_tokens
        self.prices = price_table or PriceTable.default()
        self.instance = instance or default_instance()
        self._clock: Clock = clock or LoopClock()
        self._retry = RetryPolicy(
            max_attempts, retry_backoff_base_s, retry_backoff_max_s, max_retry_wait_s
        )
        self._semaphore = FairSemaphore(max_concurrent_requests)
        self.max_concurrent_requests = max_concurrent_requests
        scale = self.rpm_window_seconds / 60.0
        self._rpm = (
            SlidingWindowGate(
                "rpm",
                math.floor(self.max_rpm * scale),
                self.rpm_window_seconds,
                clock=self._clock,
                send_guard_s=send_guard_s,
            )
            if self.max_rpm
            else None
        )
        self._tpm = (
            SlidingWindowGate(
                "tpm",
                math.floor(self.max_tpm * scale),
                self.rpm_window_seconds,
                clock=self._clock,
                send_guard_s=send_guard_s,
            )
            if self.max_tpm
            else None
        )
        self._provider: Provider = provider or OpenAIResponsesProvider(
            api_key=api_key, base_url=base_url, max_connections=max_concurrent_requests
        )
        self._owns_provider = provider is None
        self._sinks: list[EventSink] = list(sinks)
        if store_url is _UNSET:
            store_url = os.environ.get("LLMTRAIL_STORE_URL") or _DEFAULT_STORE
        self.store_url = store_url
        self._store: EventSink | None = None
        if store_url:
            factory = _load_plugin("store")
            if factory is None:
                raise ConfigurationError(
                    f"store_url={store_url!r} needs the llmtrail storage package; reinstall "
                    "llmtrail, or pass store_url=None to turn persistence off"
                )
            self._store = factory(store_url, instance=self.instance, max_queue=max_event_queue)
            self._sinks.append(self._store)
        if tracing is not False:
            factory = _load_plugin("tracing")
            sink = factory(force=bool(tracing)) if factory is not None else None
            if sink is not None:
                self._sinks.append(sink)
        self._trace_http = any(hasattr(s, "instrument_http_client") for s in self._sinks)
        self._warm_start = warm_start
        self._unanswered_guard_s = unanswered_guard_s
        # The settings a replay needs to reproduce this run; shared by every trace_created.
        self._limits = {
            "max_rpm": self.max_rpm,
            "max_tpm": self.max_tpm,
            "window_s": self.rpm_window_seconds,
            "max_concurrent_requests": max_concurrent_requests,
            "max_attempts": max_attempts,
            "default_max_output_tokens": default_max_output_tokens,
            "send_guard_s": send_guard_s,
        }
        self._meter = RateMeter()
        self._backlog: set[EventSink] = set()
        self._usage: dict[str, OperationUsage] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._portal: threading.Thread | None = None
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False
        self._active = 0
        self._idle: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sinks and warm the gates. Called by ``async with`` or the first call."""
        if self._started:
            return
        loop = asyncio.get_running_loop()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise ServiceClosedError(f"{type(self).__name__} is closed; create a new one")
            self._loop = loop
            self._idle = asyncio.Event()
            self._idle.set()
            for sink in self._sinks:
                start = getattr(sink, "start", None)
                if start is not None:
                    await start()
            if self._trace_http:
                client = getattr(self._provider, "http_client", None)
                for sink in self._sinks:
                    instrument = getattr(sink, "instrument_http_client", None)
                    if instrument is not None and client is not None:
                        instrument(client)
            if self._warm_start and isinstance(self._store, UsageHistory):
                await self._warm_gates(self._store)
            self._started = True

    async def _warm_gates(self, history: UsageHistory) -> None:
        if self._rpm is None and self._tpm is None:
            return
        now = datetime.now(UTC)
        sends = await history.recent_sends(now - timedelta(seconds=self.rpm_window_seconds + 1))
        ages = [((now - at).total_seconds(), tokens) for at, tokens in sends]
        if self._rpm is not None:
            self._rpm.preload((age, 1) for age, _ in ages)
        if self._tpm is not None:
            self._tpm.preload(ages)
        if ages:
            _log.info("gates warmed from the store", sends=len(ages))

    async def aclose(self) -> None:
        """Wait for calls in flight, flush every sink, close the provider and the sinks."""
        if self._closed:
            return
        self._closed = True
        if self._idle is not None and self._active:
            await self._idle.wait()
        try:
            for sink in self._sinks:
                await sink.flush()
        finally:
            for sink in self._sinks:
                await sink.aclose()
            if self._owns_provider:
                await self._provider.aclose()

    async def flush(self) -> None:
        """Return once every event emitted so far is durable in every sink."""
        for sink in self._sinks:
            await sink.flush()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        self._run_sync(self.start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Sync ``aclose()``; stops the private loop thread if there is one."""
        if self._loop is None or self._loop.is_closed():
            self._closed = True
            return
        self._run_sync(self.aclose())
        if self._portal is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._portal.join()
            self._loop.close()
            self._portal = None

    # -- the sync path ------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and not loop.is_closed() and (loop.is_running() or self._portal):
            return loop
        if self._started:
            raise ServiceClosedError(
                f"the event loop {type(self).__name__} was started on has stopped; create the "
                "service inside the loop you call it from, or use it only synchronously"
            )
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._portal = threading.Thread(target=run, name="llmtrail-loop", daemon=True)
        self._portal.start()
        ready.wait()
        self._loop = loop
        return loop

    def _run_sync(self, coro: Any) -> Any:
        loop = self._ensure_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError(
                "a sync method of the service was called from its own event loop thread, which "
                "would deadlock; use `await service.execute_generation_async(...)` there"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def execute_generation(
        self, request: GenerationRequest, operation_name: str | None = None
    ) -> GenerationResult:
        """Blocking call, safe from any thread; shares gates, semaphore and store."""
        parent = otel_trace.get_current_span().get_span_context()
        result: GenerationResult = self._run_sync(self._execute(request, operation_name, parent))
        return result

    # -- the async path -----------------------------------------------------------------

    async def execute_generation_async(
        self, request: GenerationRequest, operation_name: str | None = None
    ) -> GenerationResult:
        parent = otel_trace.get_current_span().get_span_context()
        return await self._execute(request, operation_name, parent)

    async def _execute(
        self, request: Any, operation_name: str | None, parent: otel_trace.SpanContext
    ) -> GenerationResult:
        if self._closed:
            raise ServiceClosedError(f"{type(self).__name__} is closed; create a new one")
        if not self._started:
            await self.start()
        backlog = self._backlog
        while backlog:  # backpressure: wait here, before the call holds any slot or permit
            # Every caller waits on the full sink (it stays in the backlog until it has room
            # again); popping it would let the next caller through while the queue is full.
            for sink in list(backlog):
                await sink.wait_for_room()
                backlog.discard(sink)
        call = _Call(
            self._sinks, self.instance, parent.trace_id if parent.is_valid else None, backlog
        )
        if parent.is_valid:
            call.trace_flags = parent.trace_flags
        self._active += 1
        if self._idle is not None:
            self._idle.clear()
        try:
            with structlog.contextvars.bound_contextvars(
                call_id=call.call_id, trace_id=call.trace_id, span_id=call.span_id
            ):
                return await self._guarded(call, request, operation_name, parent)
        finally:
            self._active -= 1
            if self._active == 0 and self._idle is not None:
                self._idle.set()

    async def _guarded(
        self, call: _Call, request: Any, operation_name: str | None, parent: otel_trace.SpanContext
    ) -> GenerationResult:
        clock = self._clock
        t0 = clock.now()
        state = _State()
        if not isinstance(request, GenerationRequest):
            try:
                request = (
                    GenerationRequest(**request)
                    if isinstance(request, Mapping)
                    else GenerationRequest(user_prompt=request)
                    if isinstance(request, str)
                    else _reject(request)
                )
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
            self._give_back(call, state, "cancelled")
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
            raise
        except Exception as exc:  # a bug of ours: report it as a result, never leak slots
            _log.exception("llmtrail internal error", error=repr(exc))
            self._give_back(call, state, "not_sent")
            return self._complete(
                call,
                state,
                request,
                op,
                model,
                None,
                ErrorType.INTERNAL,
                f"internal error in llmtrail: {exc!r}",
                t0,
                Outcome.FAILED,
            )

    def _fail_early(
        self,
        call: _Call,
        op: str,
        model: str,
        request_id: str | None,
        error_type: ErrorType,
        message: str,
        t0: float,
    ) -> GenerationResult:
        call.emit(
            EventType.TRACE_CREATED,
            {
                "operation_name": op,
                "model": model,
                "request_id": request_id,
                "metadata": {},
                "estimated_input_tokens": 0,
                "max_output_tokens": None,
                "reserved_tokens": 0,
                "rpm_at_start": 0,
                "tpm_at_start": 0,
                "parent_span_id": None,
                "temperature": None,
                "reasoning_effort": None,
                "server_address": self._provider.server_address,
                "server_port": self._provider.server_port,
                "capture_content": False,
            },
        )
        return self._complete(
            call, _State(), None, op, model, None, error_type, message, t0, Outcome.FAILED
        )

    async def _run(
        self,
        call: _Call,
        state: _State,
        request: GenerationRequest,
        op: str,
        model: str,
        parent: otel_trace.SpanContext,
        t0: float,
    ) -> GenerationResult:
        clock = self._clock
        now = t0
        est_input = estimate_input_tokens(request)
        max_out = request.max_output_tokens
        reserve = est_input + (max_out or self.default_max_output_tokens)
        rpm_now = state.rpm_now = self._meter.rpm(now)
        tpm_now = state.tpm_now = self._meter.tpm(now)
        created: dict[str, Any] = {
            "operation_name": op,
            "model": model,
            "request_id": request.request_id,
            "metadata": dict(request.metadata),
            "estimated_input_tokens": est_input,
            "max_output_tokens": max_out,
            "reserved_tokens": reserve,
            "rpm_at_start": rpm_now,
            "tpm_at_start": tpm_now,
            "parent_span_id": f"{parent.span_id:016x}" if parent.is_valid else None,
            "temperature": request.temperature,
            "reasoning_effort": request.reasoning_effort,
            "server_address": self._provider.server_address,
            "server_port": self._provider.server_port,
            "capture_content": self.capture_content,
            "limits": self._limits,
        }
        if self.capture_content:
            created["input"] = request.messages()
        call.emit(EventType.TRACE_CREATED, created)

        rpm, tpm = self._rpm, self._tpm
        try:
            if rpm is not None:
                state.rpm_res = await rpm.acquire(1)
                state.rpm_wait = state.rpm_res.waited_s
            call.emit(
                EventType.GATE_WAIT,
                {
                    "gate": "rpm",
                    "attempt": 1,
                    "amount": 1,
                    "waited_s": state.rpm_wait,
                    "waiters_ahead": state.rpm_res.waiters_ahead if state.rpm_res else 0,
                },
            )
            if tpm is not None:
                state.tpm_res = await tpm.acquire(reserve)
                state.tpm_wait = state.tpm_res.waited_s
            call.emit(
                EventType.GATE_WAIT,
                {
                    "gate": "tpm",
                    "attempt": 1,
                    "amount": reserve,
                    "waited_s": state.tpm_wait,
                    "waiters_ahead": state.tpm_res.waiters_ahead if state.tpm_res else 0,
                },
            )
        except GateRequestTooLarge as exc:
            self._give_back(call, state, "not_sent")
            return self._complete(
                call,
                state,
                request,
                op,
                model,
                None,
                ErrorType.TOO_LARGE,
                str(exc),
                t0,
                Outcome.FAILED,
            )

        sem = self._semaphore
        sem_start = clock.now()
        ahead = await sem.acquire()
        try:
            state.sem_wait = clock.now() - sem_start
            call.emit(
                EventType.SEMAPHORE_ACQUIRED,
                {
                    "waited_s": state.sem_wait,
                    "in_flight": sem.in_flight(),
                    "waiters_ahead": ahead,
                },
            )
            response: ProviderResponse | None = None
            error: ProviderError | None = None
            try:
                response = await self._attempts(call, state, request, model)
            except ProviderError as exc:
                error = exc
        finally:
            sem.release()

        if response is None:
            assert error is not None
            if not state.reached:
                self._give_back(call, state, "connection_refused")
            return self._complete(
                call,
                state,
                request,
                op,
                model,
                None,
                error.error_type,
                error.message,
                t0,
                Outcome.FAILED,
            )
        if state.tpm_res is not None and tpm is not None:
            # The provider's TPM counts real input plus max_output_tokens when given.
            counted = response.input_tokens + (max_out or response.output_tokens)
            tpm.reconcile(state.tpm_res, counted)
        return self._complete(
            call, state, request, op, model, response, None, None, t0, Outcome.SUCCEEDED
        )

    async def _attempts(
        self, call: _Call, state: _State, request: GenerationRequest, model: str
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
            _log.warning(
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
        self, call: _Call, state: _State, request: GenerationRequest, model: str, n: int
    ) -> ProviderResponse:
        clock = self._clock
        rpm, tpm = self._rpm, self._tpm
        if n > 1:
            waited = 0.0
            ahead = 0
            if rpm is not None:
                state.rpm_res = await rpm.acquire(1)
                waited, ahead = state.rpm_res.waited_s, state.rpm_res.waiters_ahead
                state.rpm_wait += waited
            call.emit(
                EventType.GATE_WAIT,
                {
                    "gate": "rpm",
                    "attempt": n,
                    "amount": 1,
                    "waited_s": waited,
                    "waiters_ahead": ahead,
                },
            )
        state.attempts = n
        call.emit(EventType.SENT, {"attempt": n})
        sent_at = clock.now()
        if state.rpm_res is not None and rpm is not None:
            rpm.mark_sent(state.rpm_res)
        if state.tpm_res is not None and tpm is not None:
            tpm.mark_sent(state.tpm_res)
        self._meter.on_send(sent_at)
        answered = False
        token = None
        if self._trace_http:
            span_context = otel_trace.SpanContext(
                int(call.trace_id, 16),
                int(child_span_id(call.span_id, f"attempt/{n}"), 16),
                is_remote=False,
                trace_flags=call.trace_flags,
            )
            token = otel_context.attach(
                otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(span_context))
            )
        try:
            invoke: Any = self._provider.invoke
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
                {
                    "attempt": n,
                    "latency_s": state.latency,
                    "error_type": str(exc.error_type),
                    "status": exc.status,
                    "retryable": exc.retryable and self._retry.should_retry(exc),
                    "retry_after_s": exc.retry_after_s,
                    "message": exc.message,
                    "provider_code": exc.provider_code,
                    "provider_request_id": exc.provider_request_id,
                    "rate_limits": exc.rate_limits,
                },
            )
            self._observe(exc.rate_limits)
            if not exc.reached_provider and state.rpm_res is not None and rpm is not None:
                rpm.release(state.rpm_res)
                call.emit(
                    EventType.UNMARKED,
                    {
                        "gate": "rpm",
                        "attempt": n,
                        "amount": 1,
                        "reason": "connection_refused",
                    },
                )
            raise
        except asyncio.CancelledError:
            state.latency = clock.now() - sent_at
            state.reached = True  # it may have arrived: keep its slots, conservatively
            call.emit(
                EventType.ATTEMPT_FAILED,
                {
                    "attempt": n,
                    "latency_s": state.latency,
                    "error_type": str(ErrorType.CANCELLED),
                    "status": None,
                    "retryable": False,
                    "retry_after_s": None,
                    "message": "cancelled while in flight",
                    "provider_code": None,
                    "provider_request_id": None,
                    "rate_limits": {},
                },
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
        state.reached = True
        state.latency = clock.now() - sent_at
        received: dict[str, Any] = {
            "attempt": n,
            "latency_s": state.latency,
            "status": response.status,
            "response_id": response.response_id,
            "response_model": response.response_model,
            "finish_reasons": response.finish_reasons,
            "input_tokens": response.input_tokens,
            "cached_tokens": response.cached_tokens,
            "output_tokens": response.output_tokens,
            "reasoning_tokens": response.reasoning_tokens,
            "total_tokens": response.input_tokens + response.output_tokens,
            "cost_usd": _money(self._cost(model, response)),
            "provider_request_id": response.provider_request_id,
            "rate_limits": response.rate_limits,
        }
        if self.capture_content:
            received["content"] = response.raw_content
        call.emit(EventType.RECEIVED, received)
        self._observe(response.rate_limits)
        return response

    def _observe(self, rate_limits: Mapping[str, str]) -> None:
        if not rate_limits:
            return
        if self._rpm is not None:
            self._rpm.observe_provider(
                _int(rate_limits.get("x-ratelimit-remaining-requests")),
                parse_reset(rate_limits.get("x-ratelimit-reset-requests")),
            )
        if self._tpm is not None:
            self._tpm.observe_provider(
                _int(rate_limits.get("x-ratelimit-remaining-tokens")),
                parse_reset(rate_limits.get("x-ratelimit-reset-tokens")),
            )

    def _cost(self, model: str, response: ProviderResponse) -> Decimal | None:
        """Priced by the model that answered, else by the model asked for; None if unpriced."""
        priced_as = response.response_model
        if not priced_as or self.prices.price(priced_as) is None:
            priced_as = model
        return self.prices.cost(
            priced_as,
            input_tokens=response.input_tokens,
            cached_tokens=response.cached_tokens,
            output_tokens=response.output_tokens,
        )

    def _give_back(self, call: _Call, state: _State, reason: str) -> None:
        """Return the reservations the provider never counted.

        Pending ones (never sent) always; sent ones only when no attempt reached the provider
        (every connection was refused). Anything that may have arrived stays counted.
        """
        never_arrived = reason == "connection_refused" and not state.reached
        for gate_name, gate, res in (
            ("rpm", self._rpm, state.rpm_res),
            ("tpm", self._tpm, state.tpm_res),
        ):
            if gate is None or res is None or res.done:
                continue
            if res.pending or never_arrived:
                amount = res.amount
                gate.release(res)
                call.emit(
                    EventType.UNMARKED,
                    {
                        "gate": gate_name,
                        "attempt": max(state.attempts, 1),
                        "amount": amount,
                        "reason": reason,
                    },
                )

    def _complete(
        self,
        call: _Call,
        state: _State,
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
        usage = Usage()
        cost: Decimal | None = None
        if response is not None:
            cost = self._cost(model, response)
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
            {
                "outcome": str(outcome),
                "error_type": str(error_type) if error_type else None,
                "error_message": message,
                "attempts": state.attempts,
                "input_tokens": usage.input_tokens,
                "cached_tokens": usage.cached_tokens,
                "output_tokens": usage.output_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "total_tokens": usage.total_tokens,
                "cost_usd": _money(cost),
                "model": (response.response_model if response else None) or model,
                "response_id": response.response_id if response else None,
                "rpm_wait_s": state.rpm_wait,
                "tpm_wait_s": state.tpm_wait,
                "semaphore_wait_s": state.sem_wait,
                "latency_s": state.latency,
                "total_s": total,
            },
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
            totals = self._usage.setdefault(op, OperationUsage())
            totals.calls += 1
            totals.cancelled += 1
        if error_type is not None and outcome is Outcome.FAILED:
            _log.warning(
                "llm call failed", operation=op, error_type=str(error_type), attempts=state.attempts
            )
        return result

    # -- figures ------------------------------------------------------------------------

    def get_current_rpm(self) -> int:
        """HTTP attempts sent in the last 60 seconds."""
        return self._meter.rpm(self._now())

    def get_current_tpm(self) -> int:
        """Tokens received in the last 60 seconds."""
        return self._meter.tpm(self._now())

    def _now(self) -> float:
        try:
            return self._clock.now()
        except RuntimeError:  # called from a thread without the loop: read the loop's time
            loop = self._loop
            return loop.time() if loop is not None else 0.0

    def stats(self) -> ServiceStats:
        now = self._now()
        return ServiceStats(
            rpm=self._meter.rpm(now),
            tpm=self._meter.tpm(now),
            in_flight=self._semaphore.in_flight(),
            waiting_rpm=self._rpm.waiting() if self._rpm else 0,
            waiting_tpm=self._tpm.waiting() if self._tpm else 0,
            waiting_semaphore=self._semaphore.waiting(),
            reserved_tokens=self._tpm.reserved() if self._tpm else 0,
            usage={op: _copy_usage(u) for op, u in self._usage.items()},
        )

    @property
    def gates(self) -> tuple[SlidingWindowGate | None, SlidingWindowGate | None]:
        """(rpm, tpm) gates, None where no limit is set."""
        return self._rpm, self._tpm

    @property
    def semaphore(self) -> FairSemaphore:
        return self._semaphore

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        return tuple(self._sinks)

    @property
    def provider(self) -> Provider:
        return self._provider


def _reject(request: object) -> GenerationRequest:
    raise TypeError(
        f"execute_generation got a {type(request).__name__}; pass a GenerationRequest, e.g. "
        "GenerationRequest(user_prompt='...')"
    )


def _copy_usage(usage: OperationUsage) -> OperationUsage:
    return OperationUsage(
        usage.calls,
        usage.succeeded,
        usage.failed,
        usage.cancelled,
        usage.input_tokens,
        usage.cached_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
        usage.cost_usd,
        usage.unpriced_calls,
    )


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None

"""``BaseLLMService``: the request path of one call, and the composition of its parts.

The flow of one call:
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
  ``trace_created``, for at most ``store_timeout_s``: a call whose store stays full is refused
  (``store_unavailable``, never sent, logged only to the sinks that had room), so memory stays
  bounded through any outage.
- ``durability="write_ahead"`` (default): ``sent`` is committed before each request leaves
  and ``completed`` before the result returns (see ``_flow``); ``"async"`` only queues them.
- Every HTTP attempt holds an RPM slot whose window starts when it is sent. A reservation the
  provider never counted is returned with an ``unmarked`` event.
- The semaphore permit is released in ``finally``; gates clean up cancelled waiters themselves.
- One event loop owns the gates (``_portal.LoopHost``). The sync ``execute_generation`` runs
  the same coroutine on it from any thread (a private loop thread when the service is used
  synchronously only), so gates, semaphore, metrics and the store are literally shared.
- ``own_loop=True`` makes that private loop thread the owner from the start: calls, sinks and
  the HTTP client run there, and ``execute_generation_async`` awaits each call from the
  caller's loop (:func:`call_on_loop`), which then only pays a hand-off per call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.metadata
import os
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog
from opentelemetry import trace as otel_trace

from llmtrail._log import get_logger

from ._call import CallStream, wait_for_room
from ._chat_provider import builtin_provider
from ._clock import LoopClock
from ._errors import ConfigurationError, ServiceClosedError
from ._events import default_instance
from ._flow import CallFlow
from ._gate_steps import AnyGate, build_gates, warm_gates
from ._gates import DEFAULT_ARRIVAL_GUARD_S
from ._portal import LoopHost, call_on_loop
from ._pricing import PriceTable
from ._redact import register_secret
from ._retry import RetryPolicy
from ._semaphore import FairSemaphore
from ._settings import (
    Limits,
    RetrySettings,
    StoreSettings,
    check_number,
    env_bool,
    env_capture,
    limits_from_environment,
    merge,
)
from ._stats import OperationUsage, RateMeter, ServiceStats
from ._types import GenerationRequest, GenerationResult
from .typing import Clock, DurableSink, EventSink, Provider, UsageHistory

if TYPE_CHECKING:
    from ._stream import GenerationStream

__all__ = ["BaseLLMService"]

_log = get_logger(__name__)
_DEFAULT_STORE = "sqlite+aiosqlite:///llmtrail.db"
_UNSET: Any = object()


def _load_plugin(name: str) -> Callable[..., Any] | None:
    for entry in importlib.metadata.entry_points(group="llmtrail.sinks"):
        if entry.name == name:
            loaded: Callable[..., Any] = entry.load()
            return loaded
    return None


class BaseLLMService:
    """Rate-aware, observable LLM calls. Subclass it to add business methods.

    Configuration: constructor arguments first, then ``LLMTRAIL_*`` environment variables
    (``LLMTRAIL_MAX_RPM``, ``LLMTRAIL_MAX_TPM``, ``LLMTRAIL_MAX_CONCURRENT``,
    ``LLMTRAIL_STORE_URL``); the SDK reads ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``. The
    settings are grouped as :class:`Limits`, :class:`RetrySettings` and :class:`StoreSettings`
    (``service.limits`` ...), which may be passed instead of their keywords (``limits=``,
    ``retry=``, ``store=``); every number is validated once, with a one-line error.

    Durability: ``durability="write_ahead"`` (the default) commits each attempt's ``sent``
    before the request leaves and the call's ``completed`` before its result is returned (or
    its cancellation re-raised): after a crash the store holds every call the application saw
    finish and every request the provider may have billed. Many calls share one commit, so
    the cost is about one commit latency per call. ``durability="async"`` only queues the
    events (the write follows within milliseconds, but a crash loses what was queued); choose
    it only if that loss is acceptable. ``store_timeout_s`` (default 10 s) bounds every wait
    for the store: a call whose ``sent`` (or, at admission, whose place in the full event
    queue) is not had in time returns ``success=False, error_type="store_unavailable"`` and is
    not sent. A ``completed`` not committed in time is logged and the result returned anyway
    (the provider answered and billed it); its event is written when the store is back.
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
        provider: Provider | str | None = None,
        store_url: str | None = _UNSET,
        sinks: Iterable[EventSink] = (),
        tracing: bool | None = None,
        capture_content: bool | None = None,
        price_table: PriceTable | None = None,
        clock: Clock | None = None,
        instance: str | None = None,
        default_max_output_tokens: int = 1024,
        send_guard_s: float | None = None,
        unanswered_guard_s: float = 1.0,
        arrival_guard_s: float = DEFAULT_ARRIVAL_GUARD_S,
        retry_backoff_base_s: float = 0.5,
        retry_backoff_max_s: float = 20.0,
        max_retry_wait_s: float = 60.0,
        max_event_queue: int = 10_000,
        rate_limit_url: str | None = _UNSET,
        rate_limit_fallback: str = "fail_closed",
        rate_limit_replicas: int = 1,
        warm_start: bool = True,
        own_loop: bool = _UNSET,
        limits: Limits | None = None,
        retry: RetrySettings | None = None,
        store: StoreSettings | None = None,
        durability: str = "write_ahead",
        store_timeout_s: float = 10.0,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigurationError(
                f"model={model!r} is invalid: name a model, e.g. 'gpt-4o-mini'"
            )
        self.model = model
        # Every number is validated here, once (pipeline/_settings.py); a group object and its
        # fields' keywords combine (a field set both ways differently is an error).
        counted = {
            name: value
            for name, value in (
                ("max_rpm", max_rpm),
                ("max_tpm", max_tpm),
                ("max_concurrent_requests", max_concurrent_requests),
            )
            if value is not _UNSET
        }
        self.limits = merge(
            Limits,
            limits,
            {
                **(limits_from_environment(counted) if limits is None else counted),
                "rpm_window_seconds": rpm_window_seconds,
                "default_max_output_tokens": default_max_output_tokens,
                "send_guard_s": send_guard_s,
                "unanswered_guard_s": unanswered_guard_s,
                "arrival_guard_s": arrival_guard_s,
            },
        )
        self.retry_settings = merge(
            RetrySettings,
            retry,
            {
                "max_attempts": max_attempts,
                "request_timeout_s": request_timeout_s,
                "retry_backoff_base_s": retry_backoff_base_s,
                "retry_backoff_max_s": retry_backoff_max_s,
                "max_retry_wait_s": max_retry_wait_s,
            },
        )
        if store is None and store_url is _UNSET:
            store_url = os.environ.get("LLMTRAIL_STORE_URL") or _DEFAULT_STORE
        self.store_settings = merge(
            StoreSettings,
            store,
            {
                **({} if store_url is _UNSET else {"store_url": store_url}),
                "max_event_queue": max_event_queue,
                "durability": durability,
                "store_timeout_s": store_timeout_s,
            },
        )
        check_number("rate_limit_replicas", rate_limit_replicas, integer=True, low=1)
        lim, rs = self.limits, self.retry_settings
        self.max_rpm = lim.max_rpm
        self.max_tpm = lim.max_tpm
        max_concurrent_requests = lim.max_concurrent_requests
        self.rpm_window_seconds = float(lim.rpm_window_seconds)
        self.request_timeout_s = float(rs.request_timeout_s)
        default_max_output_tokens = lim.default_max_output_tokens
        send_guard_s, unanswered_guard_s = lim.send_guard_s, lim.unanswered_guard_s
        arrival_guard_s = lim.arrival_guard_s
        max_attempts = rs.max_attempts
        # None: the standard OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT decides.
        self.capture_content = env_capture() if capture_content is None else capture_content
        self.default_max_output_tokens = default_max_output_tokens
        self.prices = price_table or PriceTable.default()
        self.instance = instance or default_instance()
        self._clock: Clock = clock or LoopClock()
        self._retry = RetryPolicy(
            rs.max_attempts, rs.retry_backoff_base_s, rs.retry_backoff_max_s, rs.max_retry_wait_s
        )
        self._semaphore = FairSemaphore(max_concurrent_requests)
        self.max_concurrent_requests = max_concurrent_requests
        self._provider: Provider = (
            provider
            if provider is not None and not isinstance(provider, str)
            else builtin_provider(provider or "openai", api_key, base_url, max_concurrent_requests)
        )
        if rate_limit_url is _UNSET:
            rate_limit_url = os.environ.get("LLMTRAIL_RATE_LIMIT_URL") or None
        self.rate_limit_url = rate_limit_url
        # The budget is the API key's: shared gates are keyed by its fingerprint, provider, model.
        secret = api_key or os.environ.get("OPENAI_API_KEY") or ""
        register_secret(secret)  # masked wherever it appears: events, logs, spans
        fingerprint = hashlib.sha256(secret.encode()).hexdigest()[:16]
        budget_key = f"{self._provider.name}:{model}:{fingerprint}"
        self._rpm, self._tpm = build_gates(
            self.limits,
            self._clock,
            rate_limit_url=rate_limit_url,
            key=budget_key,
            fallback=rate_limit_fallback,
            replicas=rate_limit_replicas,
        )
        self._owns_provider = provider is None or isinstance(provider, str)
        self._sinks: list[EventSink] = list(sinks)
        store_url = self.store_settings.store_url
        self.store_url = store_url
        self._store: EventSink | None = None
        durability = self.durability = self.store_settings.durability
        self.store_timeout_s = float(self.store_settings.store_timeout_s)
        if store_url:
            factory = _load_plugin("store")
            if factory is None:
                raise ConfigurationError(
                    f"store_url={store_url!r} needs the llmtrail storage package; reinstall "
                    "llmtrail, or pass store_url=None to turn persistence off"
                )
            self._store = factory(
                store_url,
                instance=self.instance,
                max_queue=self.store_settings.max_event_queue,
                store_timeout_s=self.store_timeout_s,
            )
            self._sinks.append(self._store)
        if tracing is not False:
            factory = _load_plugin("tracing")
            sink = factory(force=bool(tracing)) if factory is not None else None
            if sink is not None:
                self._sinks.append(sink)
        # The sink that traces: an HTTP span per attempt; it samples each call as it opens.
        self._tracing = next((s for s in self._sinks if hasattr(s, "instrument_http_client")), None)
        # The service the spans belong to (name, version, instance), stored with each call.
        self._resource: dict[str, str] | None = next(
            (r for s in self._sinks if (r := getattr(s, "resource_attributes", None))), None
        )
        # The sink each call waits on before it sends and before it returns (write-ahead).
        self._write_ahead: DurableSink | None = None
        if durability == "write_ahead" and isinstance(self._store, DurableSink):
            self._write_ahead = self._store
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
            "unanswered_guard_s": unanswered_guard_s,
            "arrival_guard_s": arrival_guard_s,
        }
        self._meter = RateMeter()
        self._backlog: set[EventSink] = set()
        self._usage: dict[str, OperationUsage] = {}
        # Composed, not inherited: a subclass's business methods cannot shadow a flow step.
        self._flow = CallFlow(
            model=self.model,
            request_timeout_s=self.request_timeout_s,
            capture_content=self.capture_content,
            default_max_output_tokens=self.default_max_output_tokens,
            prices=self.prices,
            clock=self._clock,
            rpm=self._rpm,
            tpm=self._tpm,
            semaphore=self._semaphore,
            provider=self._provider,
            retry=self._retry,
            meter=self._meter,
            usage=self._usage,
            limits=self._limits,
            unanswered_guard_s=self._unanswered_guard_s,
            trace_http=self._tracing is not None,
            resource=self._resource,
            arrival_guard_s=float(arrival_guard_s),
        )
        self._host = LoopHost(type(self).__name__)
        self._own_loop = env_bool("LLMTRAIL_OWN_LOOP") if own_loop is _UNSET else own_loop
        if not isinstance(self._own_loop, bool):
            raise ConfigurationError(f"own_loop={own_loop!r} is invalid: use True or False")
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False
        self._active = 0
        self._idle: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def _elsewhere(self) -> asyncio.AbstractEventLoop | None:
        """The service's own loop when the caller runs on another one (``own_loop``)."""
        if not self._own_loop:
            return None
        loop = self._host.ensure(self._started)
        return None if asyncio.get_running_loop() is loop else loop

    async def start(self) -> None:
        """Open the sinks and warm the gates. Called by ``async with`` or the first call."""
        if self._started:
            return
        if (own := self._elsewhere()) is not None:
            await call_on_loop(own, self.start())
            return
        loop = asyncio.get_running_loop()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise ServiceClosedError(f"{type(self).__name__} is closed; create a new one")
            self._host.loop = loop
            self._idle = asyncio.Event()
            self._idle.set()
            for sink in self._sinks:
                start = getattr(sink, "start", None)
                if start is not None:
                    await start()
            if self._tracing is not None:
                client = getattr(self._provider, "http_client", None)
                for sink in self._sinks:
                    instrument = getattr(sink, "instrument_http_client", None)
                    if instrument is not None and client is not None:
                        instrument(client)
            if self._warm_start and isinstance(self._store, UsageHistory):
                window = self.rpm_window_seconds
                if warmed := await warm_gates(self._rpm, self._tpm, window, self._store):
                    _log.info("gates warmed from the store", sends=warmed)
            self._started = True

    async def aclose(self) -> None:
        """Wait for calls in flight, flush every sink, close the provider and the sinks.

        The store gets at most ``store_timeout_s`` (plus, on SQLite, the busy timeout of the
        statement in flight); past it one error line says how many events it drops and why,
        and nothing is left running. With write-ahead those are the events of calls refused
        with ``store_unavailable`` (never sent: nothing billed) and ``completed`` events not
        committed in time (each such call logged a warning when its result was returned).
        """
        if self._closed:
            return
        if self._own_loop and self._host.thread is not None:
            own = self._elsewhere()
            if own is not None:
                await call_on_loop(own, self.aclose())
                await asyncio.to_thread(self._host.stop)
                return
        self._closed = True
        if self._active:
            from ._stream import close_open_streams

            await close_open_streams(self)  # abandoned but still referenced: end them
        if self._idle is not None and self._active:
            await self._idle.wait()
        try:
            for sink in self._sinks:
                # The store's aclose() writes what it holds: a flush first would wait twice.
                if sink is not self._store:
                    await sink.flush()
        finally:
            for sink in self._sinks:
                await sink.aclose()
            if self._owns_provider:
                await self._provider.aclose()
            for gate in (self._rpm, self._tpm):
                closer = getattr(gate, "aclose", None)
                if closer is not None:
                    await closer()

    async def flush(self) -> None:
        """Return once every event emitted so far is durable in every sink; the store is
        waited for at most ``store_timeout_s``, then one warning line says how many events
        are not stored yet and why (they stay queued, written when the store is back)."""
        if self._own_loop and self._host.thread is not None and (own := self._elsewhere()):
            await call_on_loop(own, self.flush())
            return
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
        if self._host.loop is None or self._host.loop.is_closed():
            self._closed = True
            return
        self._run_sync(self.aclose())
        self._host.stop()

    # -- the sync path ------------------------------------------------------------------

    def _run_sync(self, coro: Any) -> Any:  # the sync methods, and pipeline/_stream.py
        return self._host.run_sync(coro, self._started)

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
        if self._own_loop and (own := self._elsewhere()) is not None:
            return await call_on_loop(own, self._execute(request, operation_name, parent))
        return await self._execute(request, operation_name, parent)

    async def _open_call(
        self, parent: otel_trace.SpanContext, request: Any
    ) -> tuple[CallStream, str | None]:
        """Admit one call (closed check, start, backpressure), sampled as its span would be,
        and count it as active; with why it is refused (the store could not take it), or None."""
        if self._closed:
            raise ServiceClosedError(f"{type(self).__name__} is closed; create a new one")
        if not self._started:
            await self.start()
        backlog = self._backlog
        refused = await wait_for_room(backlog, self.store_timeout_s)
        call = CallStream(
            [s for s in self._sinks if s not in backlog] if refused else self._sinks,
            self.instance,
            parent,
            backlog,
            None if refused else self._write_ahead,
            self.store_timeout_s,
        )
        if (sample := getattr(self._tracing, "sample_call", None)) is not None:
            model = getattr(request, "model", None) or self.model
            call.trace_flags = sample(call.call_id, call.trace_id, parent, model)
        self._active += 1
        if self._idle is not None:
            self._idle.clear()
        return call, refused

    def _close_call(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()

    async def _execute(
        self, request: Any, operation_name: str | None, parent: otel_trace.SpanContext
    ) -> GenerationResult:
        call, refused = await self._open_call(parent, request)
        # Every log line of the call carries its ids. bind/reset directly: the generator-based
        # bound_contextvars() was the largest single cost of ours per call (profiled).
        tokens = structlog.contextvars.bind_contextvars(
            call_id=call.call_id, trace_id=call.trace_id, span_id=call.span_id
        )
        try:
            if refused is not None:
                return self._flow.refuse(call, request, operation_name, refused)
            return await self._flow.run(call, request, operation_name, parent)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
            self._close_call()

    # -- streamed calls (pipeline/_stream.py) -------------------------------------------

    def execute_generation_stream(
        self, request: GenerationRequest, operation_name: str | None = None
    ) -> GenerationStream:
        """A streamed call: ``async with service.execute_generation_stream(r) as stream:
        async for item in stream`` yields the answer's text deltas (``str``) as they arrive,
        then its :class:`GenerationResult`. Same gates, semaphore (held until the stream
        ends), retries (before the first byte only), events and spans as a plain call."""
        from ._stream import open_generation_stream

        return open_generation_stream(self, request, operation_name)

    def execute_generation_stream_sync(
        self, request: GenerationRequest, operation_name: str | None = None
    ) -> Iterator[str | GenerationResult]:
        """The blocking twin of :meth:`execute_generation_stream`, safe from any thread:
        ``for item in service.execute_generation_stream_sync(r)``. Leaving the loop early
        (``break``, an exception) ends the call as cancelled once the iterator is closed or
        collected."""
        from ._stream import iterate_sync

        return iterate_sync(self, request, operation_name)

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
            loop = self._host.loop
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
            usage={op: dataclasses.replace(u) for op, u in self._usage.items()},
            max_rpm=self.max_rpm or None,
            max_tpm=self.max_tpm or None,
            max_concurrent_requests=self.max_concurrent_requests,
        )

    @property
    def gates(self) -> tuple[AnyGate | None, AnyGate | None]:
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

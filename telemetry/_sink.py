"""The tracing sink: lifecycle events in, one span tree (and GenAI metrics) per finished call out.

Invariants:
- ``emit`` buffers a call's events by ``call_id`` and, on ``completed``, builds the call's span
  tree with :func:`plan_call_spans` and records it with :func:`record_spans` on llmtrail's
  tracer (the two functions ``traces export`` uses on stored events): real SDK spans, ended
  into the provider's processors; a BatchSpanProcessor exports them off the request path.
  ``emit`` does no I/O and always has room: ``wait_for_room`` returns at once.
- A bug in span building never reaches the caller: it is logged and the call's events dropped.
- At most ``max_pending_calls`` calls are buffered; beyond that the oldest is dropped with a
  warning (only a call that never completes can stay that long, and the store keeps its
  events for ``traces export``).
- ``flush`` force-flushes the span processors and metric readers; ``aclose`` flushes and then
  shuts down only the providers this sink created, never a user's. Both return within
  ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`) whatever the collector does: the work runs
  on a daemon thread that is left to finish (or to die with the process) when time is up, and
  once one overran, later ones do not wait behind it. The exporters' per-batch log lines are
  muted there; the sink says once per outage that the collector is not taking telemetry.
- Sampling is decided when a call starts (:meth:`TracingSink.sample_call`, as a live span's
  would be): the pipeline marks the attempts' context with the decision, so an HTTP span
  exists exactly for the calls whose tree is recorded (no orphan), and a call sampled out
  costs no span building at all. Its GenAI metrics are recorded all the same: metrics are
  never sampled. The tree of a sampled call is recorded at its end through the same sampler;
  the SDK's samplers decide from the trace id and parent alone, so the two agree.
- ``instrument_http_client`` instruments one httpx2 client (the SDK's) with the same tracer
  provider, so its CLIENT span nests under the attempt span the pipeline makes current.
- ``resource_attributes`` names the service the spans belong to (service name, version and
  instance), so the pipeline can store it with each call and ``traces export`` can reuse it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace import set_span_in_context as span_in_context

from llmtrail._log import get_logger
from llmtrail.pipeline import Event, EventType

from . import _attributes as A
from ._httpx import instrument_client
from ._metrics import GenAIMetrics
from ._outage import exporter_logs_muted, outages
from ._spans import (
    CALL_CONSTANTS,
    call_span_name,
    llmtrail_tracer,
    plan_call_spans,
    record_spans,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["DEFAULT_TIMEOUT_S", "TracingSink", "close_at_exit", "off_loop", "shut_down_within"]

_log = get_logger(__name__)

DEFAULT_MAX_PENDING_CALLS = 100_000
# How long flush() and aclose() wait for the exporters: short, because an application's
# shutdown must not hang on a collector that is down; a live one takes milliseconds.
DEFAULT_TIMEOUT_S = 2.0

# The resource attributes stored with each call (see resource_attributes).
_STORED_RESOURCE = (A.SERVICE_NAME, A.SERVICE_VERSION, A.SERVICE_INSTANCE_ID)


# Providers llmtrail built and has not shut down yet: shut down at exit within the timeout
# (instead of the SDK's own exit hook, which may wait 30 s for a dead collector).
_live: weakref.WeakSet[TracerProvider | SDKMeterProvider] = weakref.WeakSet()


_exit_hook = threading.Lock()
_exit_hooked = False


def close_at_exit(provider: TracerProvider | SDKMeterProvider) -> None:
    """Shut ``provider`` (made with ``shutdown_on_exit=False``) down at exit, within a bound."""
    global _exit_hooked
    with _exit_hook:
        if not _exit_hooked:  # registered on first use: importing configures nothing
            atexit.register(lambda: shut_down_within(_live))
            _exit_hooked = True
    _live.add(provider)


def shut_down(provider: TracerProvider | SDKMeterProvider) -> None:
    """Shut ``provider`` down now (once), instead of at exit."""
    if provider in _live:
        _live.discard(provider)  # first: a shutdown that overran is not waited for again
        provider.shutdown()


def shut_down_within(
    providers: Iterable[TracerProvider | SDKMeterProvider], timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Shut ``providers`` down, waiting at most ``timeout_s`` (a daemon thread goes on)."""
    chosen = list(providers)
    if not chosen:
        return

    def run() -> None:
        with exporter_logs_muted():
            for provider in chosen:
                shut_down(provider)

    worker = threading.Thread(target=run, name="llmtrail-telemetry-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)


def off_loop(
    work: Callable[[], object], what: str
) -> tuple[threading.Thread, asyncio.Future[str | None]]:
    """Start ``work`` on a daemon thread, with the exporters' own log lines muted; return the
    thread and a future of the first line they logged, or of the error ``work`` raised
    (``None``: all went well). A thread that overruns a wait is left to finish on its own (or
    to end with the process), so a blocked exporter can never hold up the caller."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()

    def settle(reason: str | None) -> None:
        if not done.done():
            done.set_result(reason)

    def run() -> None:
        reason: str | None = None
        with exporter_logs_muted() as muted:
            try:
                work()
            except Exception as exc:
                muted.first = f"{type(exc).__name__}: {exc}"
            reason = muted.first
        # RuntimeError: the loop closed while the work overran; nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, reason)

    thread = threading.Thread(target=run, name=f"llmtrail-telemetry-{what}", daemon=True)
    thread.start()
    return thread, done


class TracingSink:
    """An :class:`pipeline.EventSink` that turns each finished call into spans and metrics.

    Give a ``tracer_provider`` (an SDK one) for spans, a ``meter_provider`` for the GenAI
    metrics, or both. ``owns_*`` says whether :meth:`aclose` shuts that provider down.
    ``timeout_s`` bounds :meth:`flush` and :meth:`aclose`; ``endpoint`` names the collector
    in the warning when it is not taking telemetry.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        owns_tracer_provider: bool = False,
        owns_meter_provider: bool = False,
        max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        endpoint: str | None = None,
    ) -> None:
        if tracer_provider is None and meter_provider is None:
            raise ValueError(
                "TracingSink(tracer_provider=None, meter_provider=None) would record nothing: "
                "pass an SDK TracerProvider, a MeterProvider, or both"
            )
        if max_pending_calls < 1:
            raise ValueError(f"max_pending_calls={max_pending_calls!r} is invalid: use an int >= 1")
        if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} is invalid: use a number of seconds > 0")
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._tracer: Tracer | None = (
            llmtrail_tracer(tracer_provider) if tracer_provider is not None else None
        )
        self._metrics = GenAIMetrics(meter_provider) if meter_provider is not None else None
        self._owns_tracer_provider = owns_tracer_provider
        self._owns_meter_provider = owns_meter_provider
        self._max_pending = max_pending_calls
        self._timeout_s = float(timeout_s)
        self._endpoint = endpoint  # the collector, for the outage warning (None: unknown)
        # emit() may run on several threads (the sync API); one lock guards the buffer.
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, list[Event]] = OrderedDict()
        self._unsampled: set[str] = set()  # calls the sampler dropped when they started
        self._closed = False
        self._overrun: threading.Thread | None = None  # a flush still running past its wait

    @property
    def resource_attributes(self) -> dict[str, str]:
        """Service name, version and instance of the spans' resource (those it has)."""
        if self.tracer_provider is None:
            return {}
        attributes = self.tracer_provider.resource.attributes
        return {k: str(attributes[k]) for k in _STORED_RESOURCE if k in attributes}

    # --- EventSink ---------------------------------------------------------------------------
    def emit(self, event: Event) -> bool:
        if self._closed:
            return True
        dropped: str | None = None
        sampled = True
        with self._lock:
            buffered = self._pending.get(event.call_id)
            if buffered is None:
                buffered = self._pending[event.call_id] = []
                if len(self._pending) > self._max_pending:
                    dropped, _ = self._pending.popitem(last=False)
                    self._unsampled.discard(dropped)
            buffered.append(event)
            if event.type is EventType.COMPLETED:
                del self._pending[event.call_id]
                sampled = event.call_id not in self._unsampled
                self._unsampled.discard(event.call_id)
            else:
                buffered = None
        if dropped is not None:
            _log.warning(
                "tracing sink dropped an unfinished call",
                dropped_call_id=dropped,
                max_pending_calls=self._max_pending,
            )
        if buffered is not None:
            self._finish(buffered, sampled)
        return True

    def sample_call(
        self, call_id: str, trace_id: str, parent: SpanContext, model: str
    ) -> TraceFlags:
        """The sampler's decision for a call that is starting (``parent``: the caller's span
        context, invalid when there is none), as the flags its attempts' context carries."""
        kept = parent.trace_flags if parent.is_valid else TraceFlags(TraceFlags.SAMPLED)
        if self.tracer_provider is None or self._closed:  # no spans: the caller's decision
            return kept
        try:
            result = self.tracer_provider.sampler.should_sample(
                span_in_context(NonRecordingSpan(parent)) if parent.is_valid else Context(),
                int(trace_id, 16),
                call_span_name(model),
                SpanKind.CLIENT,
                {**CALL_CONSTANTS, A.GEN_AI_REQUEST_MODEL: model},
            )
        except Exception:
            # Tracing is an observer: a broken sampler must not fail the call. The tree is
            # recorded at the call's end through the same sampler, which reports it there.
            _log.exception("tracing sink's sampler failed", call_id=call_id)
            return kept
        if result.decision is Decision.RECORD_AND_SAMPLE:
            return TraceFlags(TraceFlags.SAMPLED)
        with self._lock:
            self._unsampled.add(call_id)
        return TraceFlags(TraceFlags.DEFAULT)

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        await self._bounded(self._force_flush, "flush")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._pending.clear()
            self._unsampled.clear()
        await self._bounded(self._shutdown, "close")

    async def _bounded(self, work: Callable[[], object], what: str) -> None:
        """Run ``work`` off the loop and wait for it at most ``timeout_s``; an overrun or an
        exporter's complaint is an outage (reported once per outage)."""
        if self._overrun is not None and self._overrun.is_alive():
            # An earlier flush is still stuck on the collector: this one would only queue
            # behind it. Start the work, but do not wait for it.
            off_loop(work, what)
            return
        thread, done = off_loop(work, what)
        try:
            reason = await asyncio.wait_for(asyncio.shield(done), self._timeout_s)
        except TimeoutError:
            self._overrun = thread
            reason = f"no answer within {self._timeout_s:g}s"
        if reason is not None:
            outages.failed(self._endpoint, f"{what}: {reason}")

    # --- HTTP client instrumentation --------------------------------------------------------
    def instrument_http_client(self, client: Any) -> None:
        """Trace the HTTP requests of ``client`` (an ``httpx2.AsyncClient`` or ``httpx2.Client``,
        the one the openai SDK sends with) on this sink's tracer provider.

        Only this client is instrumented, so there is exactly one HTTP span per attempt.
        """
        if self.tracer_provider is not None:
            instrument_client(client, self.tracer_provider)

    # --- internals ---------------------------------------------------------------------------
    def _finish(self, events: list[Event], sampled: bool) -> None:
        try:
            if self._metrics is not None:  # first: a call whose tree fails is still counted
                self._metrics.record_call(events)
            if self._tracer is not None and sampled:
                record_spans(self._tracer, events[0].trace_id, plan_call_spans(events))
        except Exception:
            # Tracing is an observer: it must never fail the call it observes. The events
            # stay in the store, so `llmtrail traces export` can still rebuild the tree.
            _log.exception("tracing sink could not trace a call", call_id=events[-1].call_id)

    def _force_flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if isinstance(self.meter_provider, SDKMeterProvider):
            self.meter_provider.force_flush()

    def _shutdown(self) -> None:
        tracer = self.tracer_provider if self._owns_tracer_provider else None
        meter = self.meter_provider if self._owns_meter_provider else None
        # Off the exit list first: a shutdown that overran its bound is not waited for twice.
        for owned in (tracer, meter):
            if isinstance(owned, TracerProvider | SDKMeterProvider):
                _live.discard(owned)
        if tracer is not None:
            tracer.shutdown()  # exports what is queued first
        elif self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if isinstance(meter, SDKMeterProvider):
            meter.shutdown()
        elif isinstance(self.meter_provider, SDKMeterProvider):
            self.meter_provider.force_flush()

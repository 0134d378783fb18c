"""The tracing sink: lifecycle events in, one span tree (and GenAI metrics) per finished call out.

Invariants:
- ``emit`` buffers a call's events by ``call_id`` and, on ``completed``, builds the call's span
  tree with :func:`plan_call_spans` (the function ``traces export`` uses on stored events) and
  ends the spans into the provider's processors (a BatchSpanProcessor exports them off the
  request path). ``emit`` does no I/O and always has room: ``wait_for_room`` returns at once.
- A bug in span building never reaches the caller: it is logged and the call's events dropped.
- At most ``max_pending_calls`` calls are buffered; beyond that the oldest is dropped with a
  warning (only a call that never completes can stay that long, and the store keeps its
  events for ``traces export``).
- ``flush`` force-flushes the span processors (and metric readers); ``aclose`` flushes and
  then shuts down only the providers this sink created, never a user's.
- With ``span_processor`` (the active processor of a provider llmtrail made: always-on
  sampling, default limits), finished spans are built directly (:func:`finished_spans`) and
  handed to it; the Tracer path (:func:`record_spans`) serves every other provider and any call
  whose spans would exceed the span limits. Both give the same spans.
- ``instrument_http_client`` instruments one httpx2 client (the SDK's) with the same tracer
  provider, so its CLIENT span nests under the attempt span the pipeline makes current, and
  masks any captured credential header on it.
- The helper route: when the provider is one llmtrail built around the OTLP export helper
  (:class:`ProcessSpanExporter`) and nobody added a span processor to it, a finished call is
  handed to the batch processor as one :class:`CallBundle` (its events) instead of spans;
  the exporter builds the spans (and, with ``metrics_in_helper``, records the GenAI metrics)
  in the helper, or here while the helper is away. The HTTP span then is a light
  :mod:`._http_spans` span on the same queue. The moment a user adds a processor, both go
  back to real SDK spans for every later call.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    SpanLimits,
    SpanProcessor,
    Tracer,
    TracerProvider,
    sampling,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope

from llmtrail._log import get_logger
from llmtrail.pipeline import Event, EventType

from ._bundle import CallBundle, OwnSpanProcessors, SpanTarget, record_call_metrics
from ._export_process import ProcessSpanExporter
from ._http_spans import HttpTracerProvider
from ._httpx import instrument_client
from ._metrics import GenAIMetrics
from ._spans import finished_spans, fits_limits, llmtrail_tracer, plan_call_spans, record_spans

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["TracingSink"]

_log = get_logger(__name__)

DEFAULT_MAX_PENDING_CALLS = 100_000


@dataclass(slots=True, frozen=True)
class _Direct:
    """What building spans without the Tracer needs, taken from llmtrail's tracer once."""

    processor: SpanProcessor
    resource: Resource
    scope: InstrumentationScope
    info: InstrumentationInfo
    limits: SpanLimits


def _direct_path(tracer: Tracer, processor: SpanProcessor | None) -> _Direct | None:
    """The direct path when it gives exactly the Tracer's spans, else ``None``."""
    if processor is None:
        return None
    # Any other sampler may drop calls or add attributes: only the Tracer applies it right.
    if tracer.sampler is not sampling.DEFAULT_ON and tracer.sampler is not sampling.ALWAYS_ON:
        return None
    # The provider was made with SpanLimits() read from the same environment.
    limits = SpanLimits()
    if limits.max_attribute_length is not None or limits.max_span_attribute_length is not None:
        return None  # values would be truncated; leave that to the SDK
    info = tracer.instrumentation_info
    scope = InstrumentationScope(info.name, info.version, info.schema_url)
    return _Direct(processor, tracer.resource, scope, info, limits)


@dataclass(slots=True, frozen=True)
class _Route:
    """The way to the export helper: bundles go to ``batch`` while ``active`` holds it alone."""

    active: OwnSpanProcessors
    batch: BatchSpanProcessor
    exporter: ProcessSpanExporter
    target: SpanTarget

    def open(self) -> bool:
        return self.active.added == 1


class TracingSink:
    """An :class:`pipeline.EventSink` that turns each finished call into spans and metrics.

    Give a ``tracer_provider`` (an SDK one) for spans, a ``meter_provider`` for the GenAI
    metrics, or both. ``owns_*`` says whether :meth:`aclose` shuts that provider down.
    ``span_processor`` is for a provider llmtrail built with that active span processor
    (``telemetry.configure`` and the ``OTEL_*`` setup pass it): spans then skip the Tracer.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        owns_tracer_provider: bool = False,
        owns_meter_provider: bool = False,
        max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
        span_processor: SpanProcessor | None = None,
        batch_processor: BatchSpanProcessor | None = None,
        metrics_in_helper: bool = False,
    ) -> None:
        if tracer_provider is None and meter_provider is None:
            raise ValueError(
                "TracingSink(tracer_provider=None, meter_provider=None) would record nothing: "
                "pass an SDK TracerProvider, a MeterProvider, or both"
            )
        if max_pending_calls < 1:
            raise ValueError(f"max_pending_calls={max_pending_calls!r} is invalid: use an int >= 1")
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._tracer: Tracer | None = (
            llmtrail_tracer(tracer_provider) if tracer_provider is not None else None
        )
        self._direct = (
            _direct_path(self._tracer, span_processor) if self._tracer is not None else None
        )
        self._metrics = GenAIMetrics(meter_provider) if meter_provider is not None else None
        self._route = self._helper_route(span_processor, batch_processor, metrics_in_helper)
        if self._route is not None:
            self._route.exporter.start_soon()  # ready before the first batch, as a rule
        self._owns_tracer_provider = owns_tracer_provider
        self._owns_meter_provider = owns_meter_provider
        self._max_pending = max_pending_calls
        # emit() may run on several threads (the sync API); one lock guards the buffer.
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, list[Event]] = OrderedDict()
        self._closed = False

    # --- EventSink ---------------------------------------------------------------------------
    def emit(self, event: Event) -> bool:
        if self._closed:
            return True
        dropped: str | None = None
        with self._lock:
            buffered = self._pending.get(event.call_id)
            if buffered is None:
                buffered = self._pending[event.call_id] = []
                if len(self._pending) > self._max_pending:
                    dropped, _ = self._pending.popitem(last=False)
            buffered.append(event)
            if event.type is EventType.COMPLETED:
                del self._pending[event.call_id]
            else:
                buffered = None
        if dropped is not None:
            _log.warning(
                "tracing sink dropped an unfinished call",
                dropped_call_id=dropped,
                max_pending_calls=self._max_pending,
            )
        if buffered is not None:
            self._finish(buffered)
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        await asyncio.to_thread(self._force_flush)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    # --- HTTP client instrumentation --------------------------------------------------------
    def instrument_http_client(self, client: Any) -> None:
        """Trace the HTTP requests of ``client`` (an ``httpx2.AsyncClient`` or ``httpx2.Client``,
        the one the openai SDK sends with) on this sink's tracer provider.

        Only this client is instrumented, so there is exactly one HTTP span per attempt.
        """
        if self.tracer_provider is None:
            return
        route, direct = self._route, self._direct
        if route is not None and direct is not None:
            # While bundles go to the helper, the HTTP span goes to the same queue as
            # plain fields (identical to the SDK's span; see _http_spans).
            provider: Any = HttpTracerProvider(
                self.tracer_provider, route.batch, route.open, direct.limits
            )
            instrument_client(client, provider)
        else:
            instrument_client(client, self.tracer_provider)

    # --- internals ---------------------------------------------------------------------------
    def _helper_route(
        self,
        active: SpanProcessor | None,
        batch: BatchSpanProcessor | None,
        metrics_in_helper: bool,
    ) -> _Route | None:
        """The route to the export helper when this sink's spans may be built there."""
        direct = self._direct
        if direct is None or batch is None or not isinstance(active, OwnSpanProcessors):
            return None
        exporter = batch.span_exporter
        if not isinstance(exporter, ProcessSpanExporter):
            return None
        target = SpanTarget(
            direct.resource, direct.scope, direct.info, self._metrics if metrics_in_helper else None
        )
        return _Route(active, batch, exporter, target)

    def _finish(self, events: list[Event]) -> None:
        route = self._route
        metrics_by_route = False
        if route is not None:
            if route.open():
                # The export helper builds the spans (and records the metrics) from the events.
                if self._metrics is not None and not route.target.metrics_anywhere:
                    try:
                        record_call_metrics(self._metrics, events)
                    except Exception:
                        _log.exception(
                            "tracing sink could not record metrics", call_id=events[-1].call_id
                        )
                route.batch.on_end(CallBundle(events, route.target))  # type: ignore[arg-type]
                return
            # A user's processor wants real spans, built below; the metric points still go
            # where the earlier calls' went, so that one process writes each series.
            metrics_by_route = route.target.metrics_anywhere
        try:
            if self._tracer is not None:
                plans = plan_call_spans(events)
                direct = self._direct
                if direct is not None and fits_limits(plans, direct.limits):
                    on_end = direct.processor.on_end
                    for span in finished_spans(
                        events[0].trace_id, plans, direct.resource, direct.scope, direct.info
                    ):
                        on_end(span)
                else:
                    record_spans(self._tracer, events[0].trace_id, plans)
            if metrics_by_route:
                bundle = CallBundle(events, route.target, spans=False)  # type: ignore[union-attr]
                route.batch.on_end(bundle)  # type: ignore[union-attr, arg-type]
            elif self._metrics is not None:
                record_call_metrics(self._metrics, events)
        except Exception:
            # Tracing is an observer: it must never fail the call it observes. The events
            # stay in the store, so `llmtrail traces export` can still rebuild the tree.
            _log.exception("tracing sink could not trace a call", call_id=events[-1].call_id)

    def _force_flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self._route is not None and self._route.target.metrics_anywhere:
            self._route.exporter.flush_metrics()
        if isinstance(self.meter_provider, SDKMeterProvider):
            self.meter_provider.force_flush()

    def _shutdown(self) -> None:
        self._force_flush()
        with self._lock:
            self._pending.clear()
        if self._owns_tracer_provider and self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self._owns_meter_provider and isinstance(self.meter_provider, SDKMeterProvider):
            self.meter_provider.shutdown()

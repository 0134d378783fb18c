"""A finished call's events as one item of the batch span processor's queue, turned into its
spans (and GenAI metrics) where the batch is exported: in the export helper process, or here.

Why: building a call's spans from its events and recording its three GenAI histogram points
cost about as much CPU as the call itself spends in the pipeline (the OTel SDK cleans and
hashes every attribute of every span and measurement). On the request path that CPU is taken
from the event loop. Handing the events over as they are costs a queue append; the helper
process does the rest on another core, with the very functions used in process
(:func:`spans_of` is :func:`plan_call_spans` + :func:`finished_spans`, as ``traces export``
and the in-process sink use them).

Invariants:
- A :class:`CallBundle` passes ``BatchSpanProcessor.on_end`` like a sampled span (its
  ``context`` is sampled) and is queued, batched and flushed with the spans. Only an exporter
  that knows bundles (:class:`ProcessSpanExporter`) is ever given them: the tracing sink hands
  bundles only to a processor chain that llmtrail built around such an exporter alone.
- :func:`spans_of` gives exactly the spans the in-process sink gives for the same events:
  same ids, times, attributes, events, status, resource and scope; span limits are applied
  through the SDK's own Tracer when a call would exceed them.
- :func:`flatten_bundles` / :func:`rebuild_bundles` carry every field of every event the span
  plan and the metrics read, and each call's flag: spans only, spans and metrics, or metrics
  only (for calls whose spans were exported while the helper was away, see
  ``_export_process``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.trace import SpanContext, TraceFlags

from llmtrail.pipeline import Event, EventType

from ._metrics import GenAIMetrics
from ._spans import finished_spans, fits_limits, llmtrail_tracer, plan_call_spans, record_spans

__all__ = [
    "METRICS_ONLY",
    "SPANS",
    "SPANS_AND_METRICS",
    "CallBundle",
    "OwnSpanProcessors",
    "SpanTarget",
    "flatten_bundles",
    "rebuild_bundles",
    "record_call_metrics",
    "spans_of",
]

# What the exporting side does with one call (the last field of a bundle row).
SPANS, SPANS_AND_METRICS, METRICS_ONLY = 0, 1, 2

_SAMPLED_CONTEXT = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


@dataclass(slots=True, frozen=True)
class SpanTarget:
    """What a sink's calls become: the spans' resource and scope, and their metrics.

    ``metrics``: the calls' GenAI metrics, which the export helper may record instead, on a
    meter provider it builds exactly like the in-process one; ``None`` when the sink records
    them itself (or records none).
    """

    resource: Resource
    scope: InstrumentationScope
    info: InstrumentationInfo | None
    metrics: GenAIMetrics | None

    @property
    def metrics_anywhere(self) -> bool:
        return self.metrics is not None


class OwnSpanProcessors(SynchronousMultiSpanProcessor):
    """The active span processor of a provider llmtrail builds; it counts the processors
    added, so the tracing sink knows when a user added one of theirs (which must then see
    real spans, not bundles)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.added = 0

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.added += 1


class CallBundle:
    """One finished call's events (``trace_created`` .. ``completed``) in a span queue.

    ``spans=False``: the call's spans were made elsewhere (in process, for a user's span
    processor); only its metric points travel, so they stay in the process that records them.
    """

    __slots__ = ("events", "target", "spans")
    # BatchSpanProcessor.on_end keeps only sampled spans; a finished call is always kept.
    context = _SAMPLED_CONTEXT

    def __init__(self, events: list[Event], target: SpanTarget, spans: bool = True) -> None:
        self.events = events
        self.target = target
        self.spans = spans


def spans_of(
    events: Sequence[Event],
    resource: Resource,
    scope: InstrumentationScope,
    info: InstrumentationInfo | None,
) -> list[ReadableSpan]:
    """The call's finished spans, children first, as the sink ends them."""
    plans = plan_call_spans(events)
    limits = SpanLimits()
    if fits_limits(plans, limits):
        return finished_spans(events[0].trace_id, plans, resource, scope, info)
    # Rare (hundreds of metadata keys): let the SDK's Tracer apply the limits, on a private
    # provider with the same resource and scope whose one processor collects the spans.
    collected: list[ReadableSpan] = []
    provider = TracerProvider(
        resource=resource, sampler=ALWAYS_ON, span_limits=limits, shutdown_on_exit=False
    )
    provider.add_span_processor(_Collect(collected))
    record_spans(llmtrail_tracer(provider), events[0].trace_id, plans)
    return collected


class _Collect(SpanProcessor):
    def __init__(self, into: list[ReadableSpan]) -> None:
        self._into = into

    def on_end(self, span: ReadableSpan) -> None:
        self._into.append(span)


def record_call_metrics(metrics: GenAIMetrics, events: Sequence[Event]) -> None:
    """Record one finished call's GenAI metric points."""
    received = first_token = None
    for event in reversed(events):
        if event.type is EventType.RECEIVED and received is None:
            received = event.payload
        elif event.type is EventType.FIRST_TOKEN:
            first_token = event.payload
            break
        elif event.type is EventType.SENT:  # a stream's first_token follows its last send
            break
    metrics.record(events[0], events[-1], received, first_token)


# --- the wire form ----------------------------------------------------------------------


def _target_key(target: SpanTarget) -> tuple[Any, ...]:
    scope = target.scope
    return (
        dict(target.resource.attributes),
        target.resource.schema_url,
        (scope.name, scope.version, scope.schema_url, dict(scope.attributes or {})),
    )


def flatten_bundles(
    items: Sequence[tuple[CallBundle, int]],
) -> tuple[list[Any], list[Any]]:
    """``(bundle, flag)`` pairs as plain tuples: (targets, rows), targets deduplicated."""
    targets: list[Any] = []
    seen: dict[int, int] = {}
    rows: list[Any] = []
    for bundle, flag in items:
        t = seen.get(id(bundle.target))
        if t is None:
            t = seen[id(bundle.target)] = len(targets)
            targets.append(_target_key(bundle.target))
        first = bundle.events[0]
        rows.append(
            (
                t,
                first.call_id,
                first.trace_id,
                first.span_id,
                first.instance,
                [(e.seq, e.type.value, e.occurred_at, e.payload) for e in bundle.events],
                flag,
            )
        )
    return targets, rows


@dataclass(slots=True, frozen=True)
class RebuiltCall:
    events: list[Event]
    resource: Resource
    scope: InstrumentationScope
    flag: int


def rebuild_bundles(targets: list[Any], rows: list[Any]) -> list[RebuiltCall]:
    """The inverse of :func:`flatten_bundles` (event ids are not carried: spans never read them)."""
    built = [
        (Resource(attrs, schema_url), InstrumentationScope(s[0], s[1], s[2], s[3]))
        for attrs, schema_url, s in targets
    ]
    calls: list[RebuiltCall] = []
    for t, call_id, trace_id, span_id, instance, events, flag in rows:
        resource, scope = built[t]
        calls.append(
            RebuiltCall(
                [
                    Event(
                        call_id,
                        seq,
                        EventType(type_),
                        occurred_at,
                        trace_id,
                        span_id,
                        payload,
                        instance,
                        event_id="",
                    )
                    for seq, type_, occurred_at, payload in events
                ],
                resource,
                scope,
                flag,
            )
        )
    return calls

"""Rebuild span trees from stored events and export them: backfill after a collector outage.

Invariants:
- A call is rebuilt only when its stream is complete (``trace_created`` ... ``completed``);
  calls still in flight or interrupted are counted as skipped, never half-exported.
- The tree comes from :func:`plan_call_spans`, the function the live sink uses, and is recorded
  by :func:`record_spans` on a private provider with the same instrumentation scope, so the
  exported spans carry the live trace ids, span ids, names, attributes and times.
- The resource is the live one when the events carry it: the service name, version and
  instance stored in ``trace_created["resource"]`` (else the event's ``instance`` as
  ``service.instance.id``) over the exporting shell's ``OTEL_*`` resource; an explicit
  ``service_name`` (``--service-name``) wins over the stored name.
- The exporter is called directly, batch by batch, so a failed export is reported (the CLI
  exits 1) instead of being dropped silently by a background processor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrail.pipeline import Event, EventType

from . import _attributes as A
from ._config import service_resource
from ._spans import llmtrail_tracer, plan_call_spans, record_spans

__all__ = ["ExportError", "ExportSummary", "export_traces", "rebuild_spans"]

_BATCH = 512


class ExportError(RuntimeError):
    """The exporter refused a batch (collector down, wrong endpoint, ...)."""


@dataclass(slots=True, frozen=True)
class ExportSummary:
    calls: int  # calls rebuilt and exported
    spans: int
    traces: int
    skipped: int  # calls without a completed event (in flight or interrupted)


def _complete_calls(events: Iterable[Event]) -> tuple[list[list[Event]], int]:
    by_call: dict[str, list[Event]] = {}
    for event in events:
        by_call.setdefault(event.call_id, []).append(event)
    complete: list[list[Event]] = []
    skipped = 0
    for stream in by_call.values():
        stream.sort(key=lambda e: e.seq)
        if stream[0].type is EventType.TRACE_CREATED and stream[-1].type is EventType.COMPLETED:
            complete.append(stream)
        else:
            skipped += 1
    return complete, skipped


def call_resource(created: Event, service_name: str | None = None) -> Resource:
    """The resource of a call's spans, from its ``trace_created`` event (see module doc)."""
    stored = created.payload.get("resource")
    attributes: dict[str, str] = {}
    if isinstance(stored, dict):
        attributes = {str(k): str(v) for k, v in stored.items() if isinstance(v, str)}
    if created.instance and A.SERVICE_INSTANCE_ID not in attributes:
        attributes[A.SERVICE_INSTANCE_ID] = created.instance
    if service_name:
        attributes[A.SERVICE_NAME] = service_name
    return service_resource(service_name).merge(Resource(attributes))


def rebuild_spans(
    events: Iterable[Event], resource: Resource | None = None, *, service_name: str | None = None
) -> tuple[list[ReadableSpan], int, int]:
    """The finished spans of every complete call in ``events``: (spans, calls, skipped).

    ``resource`` (for every call) overrides the one each call's events carry.
    """
    collector = InMemorySpanExporter()
    tracers: dict[tuple[tuple[str, object], ...], tuple[TracerProvider, Tracer]] = {}
    complete, skipped = _complete_calls(events)
    for stream in complete:
        chosen = resource if resource is not None else call_resource(stream[0], service_name)
        key = tuple(sorted(chosen.attributes.items()))
        entry = tracers.get(key)
        if entry is None:
            provider = TracerProvider(resource=chosen, shutdown_on_exit=False)
            provider.add_span_processor(SimpleSpanProcessor(collector))
            entry = tracers[key] = (provider, llmtrail_tracer(provider))
        record_spans(entry[1], stream[0].trace_id, plan_call_spans(stream))
    spans = list(collector.get_finished_spans())
    for provider, _ in tracers.values():
        provider.shutdown()
    return spans, len(complete), skipped


def export_traces(
    events: Iterable[Event],
    exporter: SpanExporter,
    resource: Resource | None = None,
    *,
    service_name: str | None = None,
) -> ExportSummary:
    """Rebuild the complete calls in ``events`` and send their spans through ``exporter``.

    Raises :class:`ExportError` when the exporter reports a failure.
    """
    spans, calls, skipped = rebuild_spans(events, resource, service_name=service_name)
    for start in range(0, len(spans), _BATCH):
        if exporter.export(spans[start : start + _BATCH]) is not SpanExportResult.SUCCESS:
            raise ExportError(
                f"exporting spans {start + 1}-{min(start + _BATCH, len(spans))} of {len(spans)} "
                "failed: check that the collector is up and the endpoint is right"
            )
    traces = len({span.context.trace_id for span in spans if span.context is not None})
    return ExportSummary(calls=calls, spans=len(spans), traces=traces, skipped=skipped)

"""Sampling is decided when a call starts, as a live span's would be: real calls through
BaseLLMService and the openai SDK to the local server on 127.0.0.1, spans and metrics read
from the SDK's in-memory exporter and reader.

What must hold: a call the sampler keeps has its whole tree (call, attempt and the
instrumentation's HTTP span); a call it drops has none of it, the HTTP span included (no
orphan); the decision is the sampler's for that trace id; GenAI metrics count every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
)

from llmtrail import telemetry
from llmtrail.pipeline import BaseLLMService, GenerationRequest, GenerationResult
from llmtrail.telemetry import TracingSink

KEY = "sk-test-sampling-0123456789"
CALLS = 40


async def _traced_calls(
    server: Any, sampler: Sampler, n: int, parent: SpanContext | None = None
) -> tuple[list[GenerationResult], list[ReadableSpan], int]:
    """``n`` calls with ``sampler``; their results, the finished spans, and how many calls
    the GenAI duration histogram counted."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    telemetry.configure(tracer_provider=provider, meter_provider=meters)
    try:
        async with BaseLLMService(
            "gpt-4o-mini", base_url=f"{server.url}/v1", api_key=KEY, store_url=None
        ) as service:
            request = GenerationRequest(user_prompt="Say hi", max_output_tokens=16)
            context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
            results = []
            for _ in range(n):
                token = None if context is None else otel_context.attach(context)
                try:
                    results.append(await service.execute_generation_async(request, "sampling"))
                finally:
                    if token is not None:
                        otel_context.detach(token)
    finally:
        telemetry.reset()
    data = reader.get_metrics_data()
    counted = sum(
        point.count
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "gen_ai.client.operation.duration"
        for point in metric.data.data_points
    )
    meters.shutdown()
    spans = list(exporter.get_finished_spans())
    provider.shutdown()
    return results, spans, counted


@pytest.fixture(autouse=True)
async def _no_configuration_left() -> AsyncIterator[None]:
    yield
    telemetry.reset()


async def test_a_ratio_sampler_keeps_whole_trees_and_drops_whole_calls(mock_server: Any) -> None:
    sampler = ParentBased(TraceIdRatioBased(0.5))
    results, spans, counted = await _traced_calls(mock_server, sampler, CALLS)
    assert all(r.success for r in results), [r.error_message for r in results]

    call_spans = {
        (s.attributes or {}).get("llmtrail.call_id"): s
        for s in spans
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "llmtrail"
        and s.kind is SpanKind.CLIENT
    }
    kept = {r.call_id for r in results if r.call_id in call_spans}
    # The decision is the sampler's, made from each call's trace id (2**-39 that 40 calls at
    # 0.5 all fall on one side).
    expected = {
        r.call_id
        for r in results
        if TraceIdRatioBased(0.5)
        .should_sample(None, int(r.trace_id, 16), "chat gpt-4o-mini")
        .decision.is_sampled()
    }
    assert kept == expected
    assert 0 < len(kept) < CALLS

    # No orphan: every span's parent was exported too, and every exported span belongs to a
    # call that was kept.
    ids = {s.context.span_id for s in spans if s.context is not None}
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert orphans == []
    kept_traces = {int(r.trace_id, 16) for r in results if r.call_id in kept}
    assert {s.context.trace_id for s in spans if s.context is not None} == kept_traces

    # A kept call has its whole tree: call, attempt, and the instrumentation's HTTP span.
    http = [s for s in spans if s.kind is SpanKind.CLIENT and s.name == "POST"]
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert len(http) == len(attempts) == len(kept)
    attempt_ids = {s.context.span_id for s in attempts if s.context is not None}
    assert {s.parent.span_id for s in http if s.parent is not None} == attempt_ids

    # Metrics are never sampled: every call is counted.
    assert counted == CALLS


async def test_a_caller_s_unsampled_trace_records_no_span_but_counts_the_call(
    mock_server: Any,
) -> None:
    caller = SpanContext(
        trace_id=0x5B8AA5A2D2C872E8321CF37308D69DF2,
        span_id=0x051581BF3CB55C13,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    results, spans, counted = await _traced_calls(
        mock_server, ParentBased(TraceIdRatioBased(1.0)), 3, caller
    )
    assert all(r.success for r in results)
    assert all(int(r.trace_id, 16) == caller.trace_id for r in results)
    assert [s.name for s in spans] == []
    assert counted == 3


async def test_a_call_refused_as_invalid_in_an_unsampled_trace_records_no_span(
    mock_server: Any,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.configure(tracer_provider=provider)
    caller = SpanContext(0x5B8A, 0x0515, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
    try:
        async with BaseLLMService(
            "gpt-4o-mini", base_url=f"{mock_server.url}/v1", api_key=KEY, store_url=None
        ) as service:
            result = await service.execute_generation_async({"user_prompt": 42}, "sampling")
    finally:
        otel_context.detach(token)
    assert not result.success and result.error_type == "validation"
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


class _Broken(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("sampler bug")

    def get_description(self) -> str:
        return "broken"


async def test_a_broken_sampler_ends_calls_as_results_not_exceptions(mock_server: Any) -> None:
    results, spans, counted = await _traced_calls(mock_server, _Broken(), 2)
    # The httpx instrumentation asks the sampler too, so each request fails there; the calls
    # still end as results, and are counted.
    assert [(r.success, r.error_type) for r in results] == [(False, "internal")] * 2
    assert spans == [] and counted == 2


async def test_a_metrics_only_sink_keeps_the_caller_s_decision() -> None:
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    sink = TracingSink(meter_provider=meters)
    unsampled = SpanContext(
        0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT)
    )
    assert not sink.sample_call("c1", f"{0xABC:032x}", unsampled, "m").sampled
    assert sink.sample_call("c2", f"{0xABC:032x}", INVALID_SPAN_CONTEXT, "m").sampled
    await sink.aclose()
    meters.shutdown()

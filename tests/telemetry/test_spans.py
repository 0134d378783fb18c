"""The span tree built from one call's events (telemetry._spans)."""

from __future__ import annotations

import json
import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from llmtrail.pipeline import child_span_id
from llmtrail.telemetry import IncompleteCallError, plan_call_spans, record_spans
from llmtrail.telemetry._spans import llmtrail_tracer, to_ns

from . import streams
from .streams import API_KEY


def _record(
    provider: TracerProvider, exporter: InMemorySpanExporter, b: streams.StreamBuilder
) -> dict[str, ReadableSpan]:
    record_spans(llmtrail_tracer(provider), b.trace_id, plan_call_spans(b.events))
    return {span.name: span for span in exporter.get_finished_spans()}


def _hex(span_id: int) -> str:
    return f"{span_id:016x}"


def test_success_tree_has_call_span_with_genai_attributes_and_waited_children(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.success()
    spans = _record(provider, memory_exporter, b)

    # The tpm gate waited 0.3 ms: below 1 ms, no span for it.
    assert set(spans) == {"chat gpt-4o-mini", "rpm gate", "semaphore", "attempt 1"}
    call = spans["chat gpt-4o-mini"]
    assert call.kind is SpanKind.CLIENT
    assert call.context is not None
    assert f"{call.context.trace_id:032x}" == b.trace_id
    assert _hex(call.context.span_id) == b.span_id
    assert call.parent is None
    assert call.start_time == to_ns(b.events[0].occurred_at)
    assert call.end_time == to_ns(b.events[-1].occurred_at)
    assert call.status.status_code is StatusCode.UNSET
    attrs = dict(call.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["gen_ai.response.id"] == "resp_abc123"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == 12
    assert attrs["gen_ai.usage.output_tokens"] == 9
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 4
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 2
    assert attrs["gen_ai.request.max_tokens"] == 64
    assert attrs["gen_ai.request.temperature"] == 0.2
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == 8123
    assert attrs["llmtrail.call_id"] == b.call_id
    assert attrs["llmtrail.operation_name"] == "greet"
    assert attrs["llmtrail.attempts"] == 1
    assert attrs["llmtrail.cost_usd"] == pytest.approx(0.0000072)
    assert attrs["llmtrail.rpm_wait_s"] == 0.25
    assert attrs["llmtrail.tpm_wait_s"] == 0.0003
    assert attrs["llmtrail.semaphore_wait_s"] == 0.1
    assert attrs["llmtrail.outcome"] == "succeeded"
    assert attrs["llmtrail.metadata.team"] == "search"
    assert "error.type" not in attrs
    assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs

    for name in ("rpm gate", "semaphore", "attempt 1"):
        child = spans[name]
        assert child.kind is SpanKind.INTERNAL
        assert child.parent is not None and child.parent.span_id == call.context.span_id
        assert child.context is not None and child.context.trace_id == call.context.trace_id
    assert spans["rpm gate"].context is not None
    assert _hex(spans["rpm gate"].context.span_id) == child_span_id(b.span_id, "rpm gate/1")
    assert _hex(spans["semaphore"].context.span_id) == child_span_id(b.span_id, "semaphore")
    assert _hex(spans["attempt 1"].context.span_id) == child_span_id(b.span_id, "attempt/1")

    gate_event = b.events[1]
    assert spans["rpm gate"].end_time == to_ns(gate_event.occurred_at)
    assert spans["rpm gate"].start_time == to_ns(gate_event.occurred_at) - 250_000_000
    sent, received = b.events[4], b.events[5]
    assert spans["attempt 1"].start_time == to_ns(sent.occurred_at)
    assert spans["attempt 1"].end_time == to_ns(received.occurred_at)
    attempt = dict(spans["attempt 1"].attributes or {})
    assert attempt["llmtrail.attempt"] == 1
    assert attempt["llmtrail.outcome"] == "succeeded"
    assert attempt["http.response.status_code"] == 200
    # The tpm reconciliation is an event of the call span.
    assert [e.name for e in call.events] == ["unmarked"]


def test_retry_makes_two_attempt_spans_with_the_retry_event_on_the_failed_one(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.retry_then_success()
    spans = _record(provider, memory_exporter, b)

    assert set(spans) == {"chat gpt-4o-mini", "attempt 1", "attempt 2", "rpm gate"}
    first, second = spans["attempt 1"], spans["attempt 2"]
    assert first.status.status_code is StatusCode.ERROR
    first_attrs = dict(first.attributes or {})
    assert first_attrs["error.type"] == "rate_limited"
    assert first_attrs["http.response.status_code"] == 429
    assert first_attrs["llmtrail.retry_after_s"] == 0.5
    assert first_attrs["llmtrail.outcome"] == "failed"
    assert [e.name for e in first.events] == ["retry_scheduled"]
    retry = dict(first.events[0].attributes or {})
    assert retry["llmtrail.next_attempt"] == 2
    assert retry["llmtrail.wait_s"] == 0.5
    assert second.status.status_code is StatusCode.UNSET
    assert first.end_time is not None and second.start_time is not None
    assert first.end_time < second.start_time
    # The rpm wait belongs to attempt 2 and gets its own id.
    assert spans["rpm gate"].context is not None
    assert _hex(spans["rpm gate"].context.span_id) == child_span_id(b.span_id, "rpm gate/2")
    assert dict(spans["rpm gate"].attributes or {})["llmtrail.attempt"] == 2
    call_attrs = dict(spans["chat gpt-4o-mini"].attributes or {})
    assert call_attrs["llmtrail.attempts"] == 2
    assert spans["chat gpt-4o-mini"].status.status_code is StatusCode.UNSET


def test_failed_call_has_error_status_and_no_api_key_anywhere(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.failure()
    spans = _record(provider, memory_exporter, b)

    call = spans["chat gpt-4o-mini"]
    assert call.status.status_code is StatusCode.ERROR
    assert dict(call.attributes or {})["error.type"] == "auth"
    assert dict(call.attributes or {})["llmtrail.outcome"] == "failed"
    assert "gen_ai.usage.input_tokens" not in dict(call.attributes or {})
    assert spans["attempt 1"].status.status_code is StatusCode.ERROR
    assert call.status.description is not None
    assert "Incorrect API key provided" in call.status.description
    dumped = "".join(span.to_json() for span in spans.values())
    assert API_KEY not in dumped
    assert "sk-test" not in dumped


def test_cancelled_in_flight_still_gets_a_complete_tree(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.cancelled_in_flight()
    spans = _record(provider, memory_exporter, b)

    assert set(spans) == {"chat gpt-4o-mini", "attempt 1"}
    call, attempt = spans["chat gpt-4o-mini"], spans["attempt 1"]
    assert dict(call.attributes or {})["llmtrail.outcome"] == "cancelled"
    assert dict(call.attributes or {})["error.type"] == "cancelled"
    assert call.status.status_code is StatusCode.ERROR
    assert dict(attempt.attributes or {})["llmtrail.outcome"] == "cancelled"
    assert attempt.end_time == to_ns(b.events[-2].occurred_at)
    assert call.end_time is not None and attempt.end_time is not None
    assert attempt.end_time <= call.end_time


def test_validation_failure_is_a_single_error_span(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.validation_failure()
    spans = _record(provider, memory_exporter, b)

    assert list(spans) == ["chat gpt-4o-mini"]
    attrs = dict(spans["chat gpt-4o-mini"].attributes or {})
    assert attrs["error.type"] == "validation"
    assert attrs["llmtrail.attempts"] == 0
    assert "gen_ai.request.max_tokens" not in attrs


def test_connection_refused_puts_each_unmarked_on_its_span(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.connection_refused()
    spans = _record(provider, memory_exporter, b)

    assert [e.name for e in spans["attempt 1"].events] == ["unmarked", "retry_scheduled"]
    assert [e.name for e in spans["attempt 2"].events] == ["unmarked"]
    call_events = spans["chat gpt-4o-mini"].events
    assert [dict(e.attributes or {})["llmtrail.gate"] for e in call_events] == ["tpm"]


def test_callers_span_is_the_parent_of_the_call_span(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    caller = os.urandom(8).hex()
    b = streams.success(parent_span_id=caller)
    spans = _record(provider, memory_exporter, b)

    call = spans["chat gpt-4o-mini"]
    assert call.parent is not None
    assert _hex(call.parent.span_id) == caller
    assert call.context is not None and f"{call.context.trace_id:032x}" == b.trace_id


def test_content_is_recorded_only_with_capture_content(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    spans = _record(provider, memory_exporter, streams.success(capture_content=True))
    attrs = dict(spans["chat gpt-4o-mini"].attributes or {})
    messages = json.loads(str(attrs["gen_ai.input.messages"]))
    assert messages == [{"role": "user", "parts": [{"type": "text", "content": "Say hi"}]}]
    output = json.loads(str(attrs["gen_ai.output.messages"]))
    assert output[0]["parts"][0]["content"] == "Hi there!"
    assert output[0]["finish_reason"] == "stop"


@pytest.mark.parametrize("scenario", sorted(streams.ALL_SCENARIOS))
def test_plan_is_deterministic_for_every_scenario(scenario: str) -> None:
    events = streams.ALL_SCENARIOS[scenario]().events
    assert plan_call_spans(events) == plan_call_spans(list(reversed(events)))


def test_stream_without_completed_is_rejected_with_the_call_id() -> None:
    b = streams.success()
    with pytest.raises(IncompleteCallError, match=b.call_id):
        plan_call_spans(b.events[:-1])
    with pytest.raises(IncompleteCallError, match="trace_created"):
        plan_call_spans(b.events[1:])


def test_other_tracers_on_the_same_provider_keep_random_ids(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    b = streams.success()
    record_spans(llmtrail_tracer(provider), b.trace_id, plan_call_spans(b.events))
    with provider.get_tracer("user.code").start_as_current_span("mine") as mine:
        ids = mine.get_span_context()
    assert f"{ids.trace_id:032x}" != b.trace_id
    assert f"{ids.span_id:016x}" not in {child_span_id(b.span_id, "attempt/1"), b.span_id}


def test_a_sampler_that_drops_the_call_drops_its_children(
    memory_exporter: InMemorySpanExporter,
) -> None:
    tp = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)), shutdown_on_exit=False)
    tp.add_span_processor(SimpleSpanProcessor(memory_exporter))
    b = streams.retry_then_success()
    recorded = record_spans(llmtrail_tracer(tp), b.trace_id, plan_call_spans(b.events))
    assert recorded == 0
    assert memory_exporter.get_finished_spans() == ()
    tp.shutdown()


def test_recording_uses_no_ambient_context(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    """A span current in the caller's context must not become the call span's parent."""
    b = streams.validation_failure()
    with provider.get_tracer("user.code").start_as_current_span("ambient"):
        record_spans(llmtrail_tracer(provider), b.trace_id, plan_call_spans(b.events))
    call = next(s for s in memory_exporter.get_finished_spans() if s.name.startswith("chat"))
    assert call.parent is None
    assert trace.get_current_span() is trace.INVALID_SPAN

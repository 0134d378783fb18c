"""The tracing sink (telemetry._sink): live events in, span trees and HTTP spans out."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import httpx2
import pytest
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from llmtrail.pipeline import EventSink, child_span_id
from llmtrail.telemetry import TracingSink, rebuild_spans

from . import streams
from .conftest import span_fingerprint
from .servers import serve
from .streams import API_KEY


async def test_sink_is_an_event_sink_that_always_has_room(provider: TracerProvider) -> None:
    sink = TracingSink(tracer_provider=provider)
    assert isinstance(sink, EventSink)
    assert all(sink.emit(event) for event in streams.success().events)
    await sink.wait_for_room()
    await sink.aclose()


async def test_interleaved_calls_each_get_their_own_tree(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    sink = TracingSink(tracer_provider=provider)
    calls = [factory() for factory in streams.ALL_SCENARIOS.values()]
    # Round-robin the streams, as concurrent calls would interleave them.
    for group in itertools.zip_longest(*(c.events for c in calls)):
        for event in group:
            if event is not None:
                sink.emit(event)
    await sink.flush()

    spans = memory_exporter.get_finished_spans()
    by_trace: dict[str, set[str]] = {}
    for span in spans:
        assert span.context is not None
        by_trace.setdefault(f"{span.context.trace_id:032x}", set()).add(span.name)
    assert set(by_trace) == {c.trace_id for c in calls}
    assert by_trace[calls[1].trace_id] == {"chat gpt-4o-mini", "attempt 1", "attempt 2", "rpm gate"}
    assert sink._pending == {}
    await sink.aclose()


async def test_no_span_before_the_call_completes(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    sink = TracingSink(tracer_provider=provider)
    events = streams.success().events
    for event in events[:-1]:
        sink.emit(event)
    assert memory_exporter.get_finished_spans() == ()
    sink.emit(events[-1])
    assert len(memory_exporter.get_finished_spans()) == 4
    await sink.aclose()


async def test_live_tree_equals_the_tree_rebuilt_from_the_same_events(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    calls = [factory() for factory in streams.ALL_SCENARIOS.values()]
    sink = TracingSink(tracer_provider=provider)
    for call in calls:
        for event in call.events:
            sink.emit(event)
    await sink.flush()
    live = sorted(span_fingerprint(s) for s in memory_exporter.get_finished_spans())

    rebuilt_spans, n_calls, skipped = rebuild_spans(e for c in calls for e in c.events)
    rebuilt = sorted(span_fingerprint(s) for s in rebuilt_spans)
    assert (n_calls, skipped) == (len(calls), 0)
    assert rebuilt == live
    await sink.aclose()


async def test_a_stream_that_breaks_span_building_is_logged_not_raised(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    sink = TracingSink(tracer_provider=provider)
    events = streams.success().events
    # The sink saw only the end of the call (e.g. it was added mid-call).
    assert sink.emit(events[-1]) is True
    assert memory_exporter.get_finished_spans() == ()
    await sink.aclose()


async def test_oldest_unfinished_call_is_dropped_beyond_the_bound(provider: TracerProvider) -> None:
    sink = TracingSink(tracer_provider=provider, max_pending_calls=2)
    firsts = [streams.success().events[0] for _ in range(3)]
    for event in firsts:
        sink.emit(event)
    assert list(sink._pending) == [firsts[1].call_id, firsts[2].call_id]
    await sink.aclose()


async def test_aclose_shuts_down_only_an_owned_provider(
    memory_exporter: InMemorySpanExporter,
) -> None:
    users = TracerProvider(shutdown_on_exit=False)
    users_exporter = InMemorySpanExporter()
    users.add_span_processor(BatchSpanProcessor(users_exporter))
    sink = TracingSink(tracer_provider=users)
    for event in streams.success().events:
        sink.emit(event)
    await sink.aclose()
    # Flushed on close, and the user's provider still works afterwards.
    assert len(users_exporter.get_finished_spans()) == 4
    with users.get_tracer("user").start_as_current_span("after"):
        pass
    users.force_flush()
    assert users_exporter.get_finished_spans()[-1].name == "after"
    users.shutdown()

    owned = TracerProvider(shutdown_on_exit=False)
    owned.add_span_processor(SimpleSpanProcessor(memory_exporter))
    sink = TracingSink(tracer_provider=owned, owns_tracer_provider=True)
    await sink.aclose()
    with owned.get_tracer("user").start_as_current_span("after shutdown"):
        pass
    assert memory_exporter.get_finished_spans() == ()


def test_a_sink_needs_something_to_record_to() -> None:
    with pytest.raises(ValueError, match="would record nothing"):
        TracingSink()


# --- the HTTP client span ------------------------------------------------------------------
@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A real HTTP server on 127.0.0.1 that records the headers it receives."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    async with serve({"/v1/responses": handle}) as url:
        yield url, seen


async def test_http_span_nests_under_the_attempt_span_the_pipeline_makes_current(
    provider: TracerProvider,
    memory_exporter: InMemorySpanExporter,
    echo_server: tuple[str, list[dict[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base_url, seen = echo_server
    # Even a user who asks the instrumentation to capture every request header must not get
    # the API key into a span.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", ".*")
    sink = TracingSink(tracer_provider=provider)
    b = streams.success()
    attempt_id = child_span_id(b.span_id, "attempt/1")
    async with httpx2.AsyncClient() as client:
        sink.instrument_http_client(client)
        parent = SpanContext(
            int(b.trace_id, 16),
            int(attempt_id, 16),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
        try:
            response = await client.post(
                f"{base_url}/v1/responses",
                json={"input": "hi"},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        finally:
            otel_context.detach(token)
        assert response.status_code == 200
        # A request outside any call is traced too, as a root of its own.
        await client.post(f"{base_url}/v1/responses", json={})

    http_spans = [s for s in memory_exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert len(http_spans) == 2, "one span per request: no duplicate instrumentation"
    http = http_spans[0]
    assert http.parent is not None and f"{http.parent.span_id:016x}" == attempt_id
    assert http.context is not None and f"{http.context.trace_id:032x}" == b.trace_id
    attrs = dict(http.attributes or {})
    # Old or new HTTP semconv names, depending on OTEL_SEMCONV_STABILITY_OPT_IN.
    assert attrs.get("http.status_code", attrs.get("http.response.status_code")) == 200
    assert any(key.startswith("http.request.header.") for key in attrs), "headers were captured"
    assert API_KEY not in http.to_json()
    # The traceparent header carries the HTTP span's ids to the server.
    assert seen[0]["traceparent"].split("-")[1] == b.trace_id
    await sink.aclose()


async def test_instrument_http_client_rejects_other_clients(provider: TracerProvider) -> None:
    sink = TracingSink(tracer_provider=provider)
    with pytest.raises(TypeError, match="httpx2"):
        sink.instrument_http_client(object())
    await sink.aclose()


# --- the one span path: the SDK's Tracer, with its sampler and limits ----------------------
async def test_span_limits_and_samplers_apply_as_the_sdk_applies_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "5")
    exporter = InMemorySpanExporter()
    limited = TracerProvider(shutdown_on_exit=False)
    limited.add_span_processor(SimpleSpanProcessor(exporter))
    sink = TracingSink(tracer_provider=limited, owns_tracer_provider=True)
    for event in streams.success().events:
        sink.emit(event)
    assert max(len(s.attributes or {}) for s in exporter.get_finished_spans()) == 5
    await sink.aclose()

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter.clear()
    dropping = TracerProvider(shutdown_on_exit=False)
    dropping.add_span_processor(SimpleSpanProcessor(exporter))
    sink = TracingSink(tracer_provider=dropping, owns_tracer_provider=True)
    for event in streams.success().events:
        sink.emit(event)
    assert exporter.get_finished_spans() == ()
    await sink.aclose()


async def test_spans_carry_the_scope_version_and_schema_url(
    provider: TracerProvider, memory_exporter: InMemorySpanExporter
) -> None:
    sink = TracingSink(tracer_provider=provider)
    for event in streams.success().events:
        sink.emit(event)
    await sink.aclose()
    scopes = {s.instrumentation_scope for s in memory_exporter.get_finished_spans()}
    assert len(scopes) == 1
    (scope,) = scopes
    assert scope is not None and scope.name == "llmtrail"
    assert scope.schema_url == "https://opentelemetry.io/schemas/1.41.1"

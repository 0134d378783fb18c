"""The HTTP span recorded as plain fields equals the SDK's span for the same operations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from llmtrail.telemetry._http_spans import HttpTracerProvider, _HttpSpan
from llmtrail.telemetry._httpx import instrument_client

PARENT = SpanContext(0xABC, 0x123, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
UNSAMPLED = SpanContext(0xABC, 0x124, is_remote=False, trace_flags=TraceFlags(0))


class Pair:
    """The SDK's provider and a light one over a second SDK provider, each exporting to memory."""

    def __init__(self, limits: SpanLimits | None = None, route_open: bool = True) -> None:
        self.open = route_open
        self.sdk_memory = InMemorySpanExporter()
        self.light_memory = InMemorySpanExporter()
        self.sdk = TracerProvider(span_limits=limits or SpanLimits(), shutdown_on_exit=False)
        self.sdk.add_span_processor(SimpleSpanProcessor(self.sdk_memory))
        base = TracerProvider(span_limits=limits or SpanLimits(), shutdown_on_exit=False)
        processor = SimpleSpanProcessor(self.light_memory)
        base.add_span_processor(processor)
        self.light = HttpTracerProvider(base, processor, lambda: self.open, limits or SpanLimits())
        self._providers = (self.sdk, base)

    def shutdown(self) -> None:
        for provider in self._providers:
            provider.shutdown()

    def both(self) -> tuple[ReadableSpan, ReadableSpan]:
        (sdk,) = self.sdk_memory.get_finished_spans()
        (light,) = self.light_memory.get_finished_spans()
        return sdk, light


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.shutdown()


def fields(span: ReadableSpan, *, skip_stacktrace: bool = False) -> tuple[Any, ...]:
    """Everything an exporter reads, except the span id and the times (random/clock)."""
    assert span.context is not None
    events = []
    for event in span.events:
        attrs = dict(event.attributes or {})
        if skip_stacktrace:
            attrs.pop("exception.stacktrace", None)
        events.append((event.name, attrs))
    scope = span.instrumentation_scope
    return (
        span.name,
        span.kind,
        span.context.trace_id,
        span.context.trace_flags,
        span.context.is_remote,
        span.parent,
        list(dict(span.attributes or {}).items()),  # order included
        span.dropped_attributes,
        events,
        span.dropped_events,
        [(link.context, dict(link.attributes or {})) for link in span.links],
        span.status.status_code,
        span.status.description,
        (scope.name, scope.version, scope.schema_url) if scope else None,
        dict(span.resource.attributes),
    )


def run_both(pair: Pair, ops: Callable[[trace.Span], None], **start: Any) -> None:
    """``ops`` on a span of each provider; an exception from ``ops`` is raised after both."""
    raised: list[Exception] = []
    for provider in (pair.sdk, pair.light):
        tracer = provider.get_tracer("scope", "1.0", schema_url="https://schema")
        context = trace.set_span_in_context(NonRecordingSpan(PARENT))
        try:
            with tracer.start_as_current_span("op", context=context, **start) as span:
                ops(span)
        except Exception as exc:
            raised.append(exc)
    if raised:
        raise raised[-1]


def test_the_same_operations_give_the_same_span(pair: Pair) -> None:
    def ops(span: trace.Span) -> None:
        span.set_attribute("a", 1)
        span.set_attributes({"b": "x", "c": 2.5, "d": True})
        span.set_attribute("a", 3)  # a new value moves the key to the end
        span.set_attribute("list", [1, 2])  # not plain: cleaned to a tuple
        span.set_attribute("bad", {"no": "dicts"})  # invalid: dropped
        span.add_event("evt", {"k": "v"})
        span.update_name("renamed")
        span.set_status(Status(StatusCode.ERROR, "broken"))
        span.set_status(StatusCode.UNSET)  # ignored

    run_both(pair, ops, kind=SpanKind.CLIENT, attributes={"start": "yes"})
    sdk, light = pair.both()
    assert isinstance(light, _HttpSpan)
    assert fields(light) == fields(sdk)
    assert dict(light.attributes or {})["list"] == (1, 2)
    assert light.parent == PARENT and light.context is not None
    assert light.context.trace_id == PARENT.trace_id
    assert light.start_time is not None and light.end_time is not None
    assert light.start_time <= light.end_time


def test_an_exception_in_the_block_is_recorded_like_use_span(pair: Pair) -> None:
    def ops(span: trace.Span) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        run_both(pair, ops)
    sdk, light = pair.both()
    assert fields(light, skip_stacktrace=True) == fields(sdk, skip_stacktrace=True)
    assert light.status.description == "ValueError: boom"
    assert light.events[0].name == "exception"


def test_limits_drop_what_the_sdk_drops() -> None:
    pair = Pair(SpanLimits(max_span_attributes=3, max_events=1, max_event_attributes=1))
    try:

        def ops(span: trace.Span) -> None:
            for i in range(5):
                span.set_attribute(f"k{i}", i)
            span.add_event("one", {"x": 1, "y": 2})
            span.add_event("two")

        run_both(pair, ops)
        sdk, light = pair.both()
        assert fields(light) == fields(sdk)
        assert light.dropped_attributes == 2 and light.dropped_events == 1
    finally:
        pair.shutdown()


def test_an_ended_span_ignores_changes(pair: Pair) -> None:
    tracer = pair.light.get_tracer("scope")
    span = tracer.start_span("op")
    span.end()
    span.set_attribute("late", 1)
    span.add_event("late")
    span.update_name("late")
    span.set_status(Status(StatusCode.ERROR, "late"))
    span.end()  # a second end exports nothing more
    (light,) = pair.light_memory.get_finished_spans()
    assert light.name == "op" and not light.attributes and not light.events
    assert light.status.status_code is StatusCode.UNSET


def test_the_sdk_tracer_takes_over_when_the_route_closes_or_links_or_unsampled(
    pair: Pair,
) -> None:
    tracer = pair.light.get_tracer("scope")
    pair.open = False
    closed = tracer.start_span("closed")
    assert not isinstance(closed, _HttpSpan) and closed.is_recording()
    closed.end()
    pair.open = True
    linked = tracer.start_span("linked", links=[Link(PARENT)])
    assert not isinstance(linked, _HttpSpan)
    linked.end()
    unsampled = tracer.start_span(
        "unsampled", context=trace.set_span_in_context(NonRecordingSpan(UNSAMPLED))
    )
    assert not unsampled.is_recording()
    unsampled.end()
    root = tracer.start_span("root")  # no parent: a new sampled trace
    assert isinstance(root, _HttpSpan) and root.parent is None
    assert root.get_span_context().trace_id != PARENT.trace_id
    root.end()
    names = [s.name for s in pair.light_memory.get_finished_spans()]
    assert names == ["closed", "linked", "root"]


async def test_the_httpx_instrumentation_makes_the_same_span_on_either_provider(
    pair: Pair,
) -> None:
    async def answer(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/fail":
            raise httpx2.ConnectError("refused", request=request)
        return httpx2.Response(200, json={"ok": True})

    for provider in (pair.sdk, pair.light):
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
        instrument_client(client, provider)
        token = context_api.attach(trace.set_span_in_context(NonRecordingSpan(PARENT)))
        try:
            await client.post("http://127.0.0.1:9/v1/responses", json={"x": 1})
            with pytest.raises(httpx2.ConnectError):
                await client.get("http://127.0.0.1:9/fail")
        finally:
            context_api.detach(token)
            await client.aclose()
    sdk = pair.sdk_memory.get_finished_spans()
    light = pair.light_memory.get_finished_spans()
    assert len(sdk) == len(light) == 2
    assert all(isinstance(span, _HttpSpan) for span in light)
    for a, b in zip(sdk, light, strict=True):
        assert fields(b, skip_stacktrace=True) == fields(a, skip_stacktrace=True)
    assert light[0].kind is SpanKind.CLIENT and light[0].parent == PARENT
    assert dict(light[0].attributes or {}).get("http.response.status_code", 200) == 200
    assert light[1].status.status_code is StatusCode.ERROR

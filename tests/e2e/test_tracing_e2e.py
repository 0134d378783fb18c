"""Tracing end to end: real calls through BaseLLMService and the openai SDK to the local server,
spans exported by OTLP/HTTP to a real receiver on 127.0.0.1 that decodes the protobuf, and the
same tree rebuilt from the store by ``llmtrail traces export``.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import TracerProvider

from llmtrail import telemetry
from llmtrail.pipeline import BaseLLMService, Event, EventType, GenerationRequest, child_span_id
from llmtrail.telemetry._spans import to_ns
from tests.conftest import RecordingSink
from tests.telemetry.servers import serve

KEY = "sk-test-e2e-0123456789abcdef"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    events: tuple[tuple[str, int, tuple[tuple[str, Any], ...]], ...]
    scope: str
    service_name: str
    resource: dict[str, Any] = field(default_factory=dict, compare=False)

    def fingerprint(self) -> tuple[Any, ...]:
        """What a rebuilt span must reproduce (everything but the exporting process)."""
        return (
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.name,
            self.kind,
            self.start_ns,
            self.end_ns,
            tuple(sorted(self.attributes.items())),
            self.status,
            self.status_message,
            self.events,
            self.scope,
        )


@dataclass
class Receiver:
    url: str
    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    metric_resources: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def by_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _decode_spans(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        status=s.status.code,
                        status_message=s.status.message,
                        events=tuple(
                            (
                                e.name,
                                e.time_unix_nano,
                                tuple(sorted((kv.key, _value(kv.value)) for kv in e.attributes)),
                            )
                            for e in s.events
                        ),
                        scope=ss.scope.name,
                        service_name=str(resource.get("service.name")),
                        resource=resource,
                    )
                )
    return out


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[Receiver]:
    """A real OTLP/HTTP (protobuf) receiver on 127.0.0.1, like a collector's port 4318."""
    receiver = Receiver(url="")

    async def body_of(request: web.Request) -> bytes:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        receiver.bodies.append(body)
        return body

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await body_of(request))
        receiver.spans.extend(_decode_spans(message))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def metrics(request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await body_of(request))
        for rm in message.resource_metrics:
            receiver.metric_resources.append(
                {kv.key: _value(kv.value) for kv in rm.resource.attributes}
            )
            for sm in rm.scope_metrics:
                receiver.metric_names.update(m.name for m in sm.metrics)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async with serve({"/v1/traces": traces, "/v1/metrics": metrics}) as url:
        receiver.url = url
        try:
            yield receiver
        finally:
            # Shut down what telemetry.configure() made while this loop still serves: the
            # final export would otherwise wait for a receiver whose loop has stopped.
            await asyncio.to_thread(telemetry.reset)


@pytest.fixture(autouse=True)
def clean_telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)
    telemetry.reset()
    yield
    telemetry.reset()


def _events_by_call(recorder: RecordingSink) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for event in recorder.events:
        out.setdefault(event.call_id, []).append(event)
    return out


async def _run_calls(
    url: str, recorder: RecordingSink, store_url: str | None, **service_kwargs: Any
) -> dict[str, Any]:
    """A call inside the caller's own span (the server answers its first attempt with 429),
    then a call outside any span."""
    caller_provider = TracerProvider(shutdown_on_exit=False)  # the application's own tracing
    results: dict[str, Any] = {}
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{url}/v1",
        api_key=KEY,
        store_url=store_url,
        sinks=[recorder],
        max_rpm=600,
        max_tpm=100_000,
        retry_backoff_base_s=0.01,
        **service_kwargs,
    ) as service:
        with caller_provider.get_tracer("app").start_as_current_span("handler") as handler:
            results["in_span"] = await service.execute_generation_async(
                GenerationRequest(
                    user_prompt="Say hi",
                    metadata={"tenant": "acme"},
                    max_output_tokens=32,
                    temperature=0.5,
                ),
                "greet",
            )
        results["handler"] = handler.get_span_context()
        results["root"] = await service.execute_generation_async(
            GenerationRequest(user_prompt="Say bye"), "farewell"
        )
    caller_provider.shutdown()
    return results


async def test_live_spans_reach_a_real_otlp_receiver_as_one_tree_per_call(
    mock_server_factory: Any, otlp_receiver: Receiver, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(
        fault_script=("rate_limit_429",), fault_429_retry_after_s=0.01
    )
    telemetry.configure(endpoint=otlp_receiver.url, service_name="e2e")
    results = await _run_calls(server.url, recorder, None)
    first, second, handler = results["in_span"], results["root"], results["handler"]
    assert first.success and second.success, (first.error_message, second.error_message)
    assert first.attempts == 2, "the scripted 429 hit the first call"
    assert second.attempts == 1

    events = _events_by_call(recorder)
    # --- the call made inside the caller's span ------------------------------------------
    assert first.trace_id == f"{handler.trace_id:032x}", "the caller's trace is inherited"
    spans = otlp_receiver.by_trace(first.trace_id)
    call_events = events[first.call_id]
    call_span_id = call_events[0].span_id
    assert all(e.trace_id == first.trace_id and e.span_id == call_span_id for e in call_events)
    by_id = {s.span_id: s for s in spans}
    call = by_id[call_span_id]
    assert call.name == "chat gpt-4o-mini"
    assert call.kind == Span.SPAN_KIND_CLIENT
    assert call.parent_id == f"{handler.span_id:016x}"
    assert call.service_name == "e2e"
    assert call.scope == "llmtrail"
    a = call.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"]
    assert a["gen_ai.response.id"] == first.response_id
    assert a["gen_ai.usage.input_tokens"] == first.usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] == first.usage.output_tokens
    assert a["gen_ai.request.max_tokens"] == 32
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == int(server.url.rsplit(":", 1)[1])
    assert a["llmtrail.call_id"] == first.call_id
    assert a["llmtrail.operation_name"] == "greet"
    assert a["llmtrail.attempts"] == 2
    assert a["llmtrail.outcome"] == "succeeded"
    assert a["llmtrail.metadata.tenant"] == "acme"
    assert call.status == Status.STATUS_CODE_UNSET

    # Two attempt spans with the derived ids; the first failed with a 429.
    for n in (1, 2):
        attempt = by_id[child_span_id(call_span_id, f"attempt/{n}")]
        assert attempt.name == f"attempt {n}"
        assert attempt.parent_id == call_span_id
        assert attempt.kind == Span.SPAN_KIND_INTERNAL
        sent = next(
            e for e in call_events if e.type is EventType.SENT and e.payload["attempt"] == n
        )
        assert attempt.start_ns == to_ns(sent.occurred_at)
        # Exactly one HTTP span per attempt, nested under it, inside its time span.
        http = [s for s in spans if s.parent_id == attempt.span_id]
        assert len(http) == 1, http
        assert http[0].kind == Span.SPAN_KIND_CLIENT
        assert http[0].scope == "opentelemetry.instrumentation.httpx"
        assert attempt.start_ns <= http[0].start_ns <= http[0].end_ns <= attempt.end_ns
    failed = by_id[child_span_id(call_span_id, "attempt/1")]
    assert failed.status == Status.STATUS_CODE_ERROR
    assert failed.attributes["error.type"] == "rate_limited"
    assert failed.attributes["http.response.status_code"] == 429
    assert [e[0] for e in failed.events] == ["retry_scheduled"]
    assert len(spans) == len({s.span_id for s in spans}), "no duplicate spans"

    # --- the second call: a root trace of its own -----------------------------------------
    second_spans = otlp_receiver.by_trace(second.trace_id)
    second_call = next(s for s in second_spans if s.name == "chat gpt-4o-mini")
    assert second_call.parent_id is None
    assert second_call.span_id == events[second.call_id][0].span_id
    assert {s.name for s in second_spans} >= {"chat gpt-4o-mini", "attempt 1"}

    # --- never an API key, in any byte the collector received -----------------------------
    assert otlp_receiver.bodies
    assert not any(KEY.encode() in body or b"sk-test" in body for body in otlp_receiver.bodies)
    # GenAI metrics went to the same endpoint (the service's close flushed them).
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= (
        otlp_receiver.metric_names
    )


async def test_traces_export_from_the_store_rebuilds_the_live_tree(
    mock_server_factory: Any,
    otlp_receiver: Receiver,
    recorder: RecordingSink,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmtrail.pipeline._cli import main as cli_main
    from llmtrail.storage import EventStore

    server = await mock_server_factory(
        fault_script=("rate_limit_429",), fault_429_retry_after_s=0.01
    )
    telemetry.configure(endpoint=otlp_receiver.url, service_name="e2e")
    results = await _run_calls(server.url, recorder, sqlite_url)
    live = [s for s in otlp_receiver.spans if s.scope == "llmtrail"]
    http = [s for s in otlp_receiver.spans if s.scope != "llmtrail"]
    assert len(http) == 3, "one HTTP span per attempt: 2 + 1"

    # The stored events carry the live ids.
    async with await EventStore.open(sqlite_url) as store:
        for key in ("in_span", "root"):
            stored = await store.events_for_call(results[key].call_id)
            assert stored and stored[-1].type is EventType.COMPLETED
            call_span = next(s for s in live if s.span_id == stored[0].event.span_id)
            assert call_span.trace_id == stored[0].event.trace_id == results[key].trace_id

    otlp_receiver.spans.clear()
    # The shell that exports is another service: the resource comes from the stored calls.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "the-exporting-shell")
    code = await asyncio.to_thread(
        cli_main, ["traces", "export", "--store", sqlite_url, "--endpoint", otlp_receiver.url]
    )
    assert code == 0
    rebuilt = otlp_receiver.spans
    assert sorted(s.fingerprint() for s in rebuilt) == sorted(s.fingerprint() for s in live)
    assert {s.service_name for s in rebuilt} == {"e2e"}
    instance = "service.instance.id"
    assert {s.resource[instance] for s in rebuilt} == {s.resource[instance] for s in live}
    # The HTTP spans' parents are spans of the rebuilt tree.
    assert {s.parent_id for s in http} <= {s.span_id for s in rebuilt}

    # One call, by id; and the summary line says what was sent.
    otlp_receiver.spans.clear()
    code = await asyncio.to_thread(
        cli_main,
        [
            "traces", "export", "--store", sqlite_url, "--endpoint", otlp_receiver.url,
            "--call", results["root"].call_id,
        ],
    )  # fmt: skip
    assert code == 0
    assert {s.trace_id for s in otlp_receiver.spans} == {results["root"].trace_id}


async def test_traces_export_reports_a_collector_that_is_down_in_one_line(
    mock_server: Any, recorder: RecordingSink, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmtrail.pipeline._cli import main as cli_main

    await _run_calls(mock_server.url, recorder, sqlite_url, tracing=False)
    code = await asyncio.to_thread(
        cli_main,
        [
            "traces", "export", "--store", sqlite_url, "--endpoint", "http://127.0.0.1:9",
            "--timeout", "1",
        ],
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "traces export" in line]) == 1
    assert "Traceback" not in "\n".join(err)
    assert "collector" in err[-1]


@pytest.mark.parametrize("how", ["configure()", "variables alone"])
async def test_configure_without_arguments_exports_spans_and_metrics_with_one_resource(
    mock_server: Any,
    otlp_receiver: Receiver,
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-variables")
    if how == "configure()":
        telemetry.configure()
    results = await _run_calls(mock_server.url, recorder, None)
    assert results["root"].success
    # Spans and GenAI metrics both reached the receiver...
    assert otlp_receiver.by_trace(results["root"].trace_id)
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= (
        otlp_receiver.metric_names
    )
    # ... under one resource, whose instance is the one the events carry.
    span_resources = {tuple(sorted(s.resource.items())) for s in otlp_receiver.spans}
    llmtrail_resources = {
        tuple(sorted(s.resource.items())) for s in otlp_receiver.spans if s.scope == "llmtrail"
    }
    assert len(llmtrail_resources) == 1
    (resource,) = llmtrail_resources
    assert span_resources == llmtrail_resources, "the HTTP spans share it too"
    assert {tuple(sorted(r.items())) for r in otlp_receiver.metric_resources} == {resource}
    attributes = dict(resource)
    assert attributes["service.name"] == "from-variables"
    assert attributes["service.instance.id"] == recorder.events[0].instance
    assert recorder.events[0].payload["resource"] == {
        "service.name": "from-variables",
        "service.instance.id": recorder.events[0].instance,
    }


@pytest.mark.slow
async def test_a_dead_collector_never_holds_up_the_application(
    mock_server: Any,
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket
    import time

    import structlog

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", dead)
    telemetry.configure()
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        async with BaseLLMService(
            "gpt-4o-mini", base_url=f"{mock_server.url}/v1", api_key=KEY, store_url=None,
            sinks=[recorder],
        ) as service:  # fmt: skip
            results = await asyncio.gather(
                *(
                    service.execute_generation_async(GenerationRequest(user_prompt="hi"), "dead")
                    for _ in range(20)
                )
            )
            calls_done = time.monotonic()
            await service.flush()
        closed = time.monotonic()
    assert all(r.success for r in results)
    # flush() and aclose() are bounded by the 2 s default whatever the collector does (the
    # bound here leaves room for a loaded machine; without it they took 14 s and 20 s).
    assert closed - calls_done < 6, closed - calls_done
    assert closed - started < 30
    warnings = [e for e in logs if e["log_level"] == "warning" and "collector" in e["event"]]
    assert len(warnings) == 1, warnings
    # None of the exporter's per-retry lines reached the logs.
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]

"""Finished calls as bundles for the OTLP export helper, end to end: real calls through
BaseLLMService to the local OpenAI-compatible server, a real export helper process, and a real
OTLP/HTTP receiver on 127.0.0.1 that decodes what it gets.

What is checked against what: the span trees at the receiver against the spans
``telemetry._bundle.spans_of`` builds in this process from the very events the calls emitted
(byte for byte, as the OTLP encoder writes them); the GenAI histograms at the receiver against
the calls' own token counts and durations. Metric exports are cumulative (the OTLP default):
a series is identified by its attributes and its start time, which is the moment the first
point of that attribute set was recorded *in the process that records it*; two processes
writing one series therefore show up as two start times for one attribute set.

Periodic exports are pushed out of reach (``OTEL_METRIC_EXPORT_INTERVAL``,
``OTEL_BSP_SCHEDULE_DELAY``), so spans and metric points leave a process only when a test
flushes: every assertion below reads what a flush made arrive, nothing depends on a timer.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from llmtrail import telemetry
from llmtrail.pipeline import (
    BaseLLMService,
    Event,
    EventType,
    GenerationRequest,
    GenerationResult,
    child_span_id,
)
from llmtrail.telemetry import _config, _export_process
from llmtrail.telemetry._bundle import CallBundle, spans_of
from llmtrail.telemetry._export_process import ProcessSpanExporter
from llmtrail.telemetry._spans import llmtrail_tracer
from tests.conftest import RecordingSink
from tests.e2e.test_tracing_e2e import (  # noqa: F401 (fixtures)
    ReceivedSpan,
    Receiver,
    _decode_spans,
    _value,
    clean_telemetry,
    otlp_receiver,
)
from tests.pipeline.test_service import service_for
from tests.telemetry.conftest import span_fingerprint

TOKEN_USAGE = "gen_ai.client.token.usage"
DURATION = "gen_ai.client.operation.duration"
HTTP_SCOPE = "opentelemetry.instrumentation.httpx"
SERVICE_NAME = "bundles-e2e"
# More metadata keys than the 128 attributes a span keeps: such a call's spans are built
# through the SDK's Tracer, which drops the oldest attributes.
BIG_METADATA = {f"key{i:03}": f"value {i}" for i in range(200)}


@pytest.fixture(autouse=True)
def exports_only_when_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No periodic export (here or in the helper, which inherits the environment), cumulative
    metric temporality, and the export helper on unless a test turns it off."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    for name in (
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_METRICS_EXPORTER",
        "OTEL_RESOURCE_ATTRIBUTES",
        "LLMTRAIL_OTLP_EXPORT_PROCESS",
    ):
        monkeypatch.delenv(name, raising=False)


# A sitecustomize for the export helper: it waits, before importing anything, until the gate
# file exists (20 s at most), so that a test decides when "the helper is still starting" ends.
_GATE_SITECUSTOMIZE = """
import os, time
gate = os.environ.get("LLMTRAIL_TEST_HELPER_GATE")
deadline = time.monotonic() + 20.0
while gate and not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


@pytest.fixture
def helper_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A file whose creation lets export helpers started from now on finish starting (it is
    created at teardown at the latest, before the receiver's teardown shuts telemetry down)."""
    site = tmp_path / "gate-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_GATE_SITECUSTOMIZE)
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    gate = tmp_path / "gate-open"
    monkeypatch.setenv("LLMTRAIL_TEST_HELPER_GATE", str(gate))
    yield gate
    gate.touch()  # in case the test did not get that far


# --- the calls ---------------------------------------------------------------------------


def _service(url: str, recorder: RecordingSink) -> BaseLLMService:
    """A service whose tracing sink comes from telemetry.configure() / the OTEL_* variables."""
    return service_for(
        url, recorder, tracing=None, max_rpm=None, max_tpm=None, retry_backoff_base_s=0.01
    )


async def _calls(
    service: BaseLLMService, tag: str, n: int, metadata: dict[str, str] | None = None
) -> list[GenerationResult]:
    request_metadata = {"batch": tag, **(metadata or {})}
    results = await asyncio.gather(
        *(
            service.execute_generation_async(
                GenerationRequest(user_prompt=f"{tag} {i}", metadata=request_metadata), tag
            )
            for i in range(n)
        )
    )
    assert all(r.success for r in results), [r.error_message for r in results]
    return list(results)


def _events(recorder: RecordingSink, results: Sequence[GenerationResult]) -> list[list[Event]]:
    by_call = recorder.by_call()
    out: list[list[Event]] = []
    for result in results:
        events: list[Event] = by_call[result.call_id]  # type: ignore[assignment]
        assert events[-1].type is EventType.COMPLETED
        out.append(events)
    return out


# --- what the in-process path gives ------------------------------------------------------


def _in_process_spans(
    provider: TracerProvider, recorder: RecordingSink, results: Sequence[GenerationResult]
) -> list[ReadableSpan]:
    """The calls' spans as the in-process sink builds them, from the events the calls emitted."""
    info = llmtrail_tracer(provider).instrumentation_info
    scope = InstrumentationScope(info.name, info.version, info.schema_url)
    spans: list[ReadableSpan] = []
    for events in _events(recorder, results):
        spans.extend(spans_of(events, provider.resource, scope, info))
    return spans


# --- what the receiver got ---------------------------------------------------------------


def _trace_request(body: bytes) -> ExportTraceServiceRequest | None:
    """``body`` as a trace export, or None when it is a metrics export (the receiver keeps
    both kinds of body in one list: a metrics body read as traces has no 16-byte trace id)."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return None
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    if spans and all(len(s.trace_id) == 16 and len(s.span_id) == 8 for s in spans):
        return request
    return None


def _wire_spans(requests: Sequence[ExportTraceServiceRequest], scope: str) -> list[bytes]:
    """Each span of ``scope`` as the bytes of (resource, scope, span), sorted."""
    out: list[bytes] = []
    for request in requests:
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                if ss.scope.name != scope:
                    continue
                for span in ss.spans:
                    out.append(
                        rs.resource.SerializeToString(deterministic=True)
                        + b"|"
                        + ss.scope.SerializeToString(deterministic=True)
                        + b"|"
                        + span.SerializeToString(deterministic=True)
                    )
    return sorted(out)


def _assert_same_trees(receiver: Receiver, expected: Sequence[ReadableSpan]) -> None:
    """The receiver got exactly ``expected`` as llmtrail's spans: no more, no fewer, no
    duplicate, and every field as the in-process encoder writes it."""
    live = [s for s in receiver.spans if s.scope == "llmtrail"]
    want = _decode_spans(encode_spans(expected))
    assert sorted(live, key=ReceivedSpan.fingerprint) == sorted(want, key=ReceivedSpan.fingerprint)
    assert {s.service_name for s in live} == {SERVICE_NAME}
    received = [r for r in map(_trace_request, receiver.bodies) if r is not None]
    assert _wire_spans(received, "llmtrail") == _wire_spans([encode_spans(expected)], "llmtrail")


def _assert_http_spans_nest(
    receiver: Receiver, recorder: RecordingSink, results: Sequence[GenerationResult]
) -> None:
    """One HTTP CLIENT span per attempt of each call, its parent the attempt span, inside it."""
    by_id = {s.span_id: s for s in receiver.spans}
    http = [s for s in receiver.spans if s.scope == HTTP_SCOPE]
    attempts = 0
    for result, events in zip(results, _events(recorder, results), strict=True):
        for n in range(1, result.attempts + 1):
            attempt = by_id[child_span_id(events[0].span_id, f"attempt/{n}")]
            assert attempt.name == f"attempt {n}"
            children = [s for s in http if s.parent_id == attempt.span_id]
            assert len(children) == 1, (result.call_id, n, children)
            assert children[0].trace_id == result.trace_id
            assert attempt.start_ns <= children[0].start_ns <= children[0].end_ns
            assert children[0].end_ns <= attempt.end_ns
            attempts += 1
    assert len(http) == attempts, "no HTTP span without its attempt span"


@dataclass(frozen=True)
class Point:
    """One histogram data point of a metrics export."""

    name: str
    attributes: tuple[tuple[str, Any], ...]
    start_ns: int
    time_ns: int
    count: int
    sum: float
    resource: tuple[tuple[str, Any], ...]

    @property
    def series(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return self.name, self.attributes

    @property
    def token_type(self) -> Any:
        return dict(self.attributes).get("gen_ai.token.type")


def _points(bodies: Sequence[bytes]) -> list[Point]:
    """The GenAI histogram points of the metrics exports among ``bodies``."""
    out: list[Point] = []
    for body in bodies:
        if _trace_request(body) is not None:
            continue
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for rm in request.resource_metrics:
            resource = tuple(sorted((kv.key, _value(kv.value)) for kv in rm.resource.attributes))
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name not in (TOKEN_USAGE, DURATION):
                        continue
                    histogram = metric.histogram
                    assert histogram.aggregation_temporality == (
                        AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                    )
                    for dp in histogram.data_points:
                        out.append(
                            Point(
                                metric.name,
                                tuple(sorted((kv.key, _value(kv.value)) for kv in dp.attributes)),
                                dp.start_time_unix_nano,
                                dp.time_unix_nano,
                                dp.count,
                                dp.sum,
                                resource,
                            )
                        )
    return out


Totals = dict[tuple[str, Any], tuple[int, float]]


def _totals(points: Sequence[Point]) -> Totals:
    """Counts and sums by (metric, token type): the latest cumulative point of each series
    instance (attributes + start time), added up over the instances."""
    latest: dict[tuple[Any, ...], Point] = {}
    for p in points:
        key = (p.series, p.start_ns)
        if key not in latest or p.time_ns >= latest[key].time_ns:
            latest[key] = p
    totals: Totals = {}
    for p in latest.values():
        count, total = totals.get((p.name, p.token_type), (0, 0.0))
        totals[(p.name, p.token_type)] = (count + p.count, total + p.sum)
    return totals


def _expected_totals(recorder: RecordingSink, results: Sequence[GenerationResult]) -> Totals:
    durations = [events[-1].payload["total_s"] for events in _events(recorder, results)]
    n = len(results)
    return {
        (TOKEN_USAGE, "input"): (n, float(sum(r.usage.input_tokens for r in results))),
        (TOKEN_USAGE, "output"): (n, float(sum(r.usage.output_tokens for r in results))),
        (DURATION, None): (n, float(sum(durations))),
    }


def _assert_totals(actual: Totals, expected: Totals) -> None:
    assert actual.keys() == expected.keys()
    for key, (count, total) in expected.items():
        assert actual[key][0] == count, key
        assert actual[key][1] == pytest.approx(total, rel=1e-9), key


def _start_times(points: Sequence[Point]) -> dict[tuple[str, Any], set[int]]:
    """The start times seen for each series: one per process that wrote it."""
    out: dict[tuple[str, Any], set[int]] = {}
    for p in points:
        out.setdefault(p.series, set()).add(p.start_ns)
    return out


def _assert_one_writer(points: Sequence[Point]) -> None:
    starts = _start_times(points)
    assert starts, "no GenAI metric point arrived"
    assert all(len(s) == 1 for s in starts.values()), starts
    assert {dict(p.resource).get("service.name") for p in points} == {SERVICE_NAME}


def _assert_metrics(
    receiver: Receiver, recorder: RecordingSink, results: Sequence[GenerationResult]
) -> list[Point]:
    """Everything the receiver got adds up to the calls' points, each series from one writer."""
    points = _points(receiver.bodies)
    _assert_totals(_totals(points), _expected_totals(recorder, results))
    _assert_one_writer(points)
    return points


# --- the export helper and what crosses it ----------------------------------------------


def _configured_meter_provider() -> SDKMeterProvider:
    configured = _config._configured
    assert configured is not None
    provider = configured.meter_provider
    assert isinstance(provider, SDKMeterProvider)
    return provider


@dataclass(frozen=True)
class Batch:
    """What one export() call of the batch processor was given."""

    bundles: int
    spans: int
    llmtrail_spans: int
    helper_pid: int | None
    metrics_only: int = 0  # bundles carrying a call's metric points only (spans built here)


@dataclass(frozen=True)
class Configured:
    """What telemetry.configure(endpoint=receiver) built, and the batches its exporter got."""

    provider: TracerProvider
    exporter: SpanExporter
    batches: list[Batch]

    @property
    def helper(self) -> ProcessSpanExporter:
        assert isinstance(self.exporter, ProcessSpanExporter)
        return self.exporter

    async def serving_helper(self) -> int:
        """Start the export helper and wait until it serves; its pid."""
        assert await asyncio.to_thread(self.helper.wait_until_ready)
        pid = self.helper.helper_pid
        assert pid is not None and pid != os.getpid()
        assert "llmtrail.telemetry._export_worker" in " ".join(psutil.Process(pid).cmdline())
        return pid


def _configure(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Configured:
    provider = telemetry.configure(endpoint=receiver.url, service_name=SERVICE_NAME)
    configured = _config._configured
    assert configured is not None and configured.batch_processor is not None
    exporter: SpanExporter = configured.batch_processor.span_exporter
    return Configured(provider, exporter, _watch_exports(monkeypatch, exporter))


def _watch_exports(monkeypatch: pytest.MonkeyPatch, exporter: SpanExporter) -> list[Batch]:
    """Record each batch the batch span processor hands ``exporter`` (which still exports it)."""
    seen: list[Batch] = []
    export = exporter.export

    def watched(items: Sequence[ReadableSpan]) -> SpanExportResult:
        bundles = sum(isinstance(item, CallBundle) and item.spans for item in items)
        metrics_only = sum(isinstance(item, CallBundle) and not item.spans for item in items)
        own = sum(
            not isinstance(item, CallBundle)
            and item.instrumentation_scope is not None
            and item.instrumentation_scope.name == "llmtrail"
            for item in items
        )
        pid = exporter.helper_pid if isinstance(exporter, ProcessSpanExporter) else None
        spans = len(items) - bundles - metrics_only
        seen.append(Batch(bundles, spans, own, pid, metrics_only))
        return export(items)

    monkeypatch.setattr(exporter, "export", watched)
    return seen


async def _flush_here_only(receiver: Receiver) -> list[Point]:
    """Flush this process's meter provider alone; the GenAI points that export carried.

    Exports are cumulative, so this shows every point this process ever recorded."""
    before = len(receiver.bodies)
    assert await asyncio.to_thread(_configured_meter_provider().force_flush)
    return _points(receiver.bodies[before:])


async def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(psutil.Process(pid).wait, 10)


def _live_tracer_providers() -> int:
    gc.collect()
    return sum(type(o) is TracerProvider for o in gc.get_objects())


# --- the tests ---------------------------------------------------------------------------


async def test_the_helper_builds_the_span_trees_the_in_process_path_builds(
    mock_server_factory: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first call's first attempt gets a 429: a tree with a failed attempt and a retry.
    server = await mock_server_factory(
        fault_script=("rate_limit_429",), fault_429_retry_after_s=0.01
    )
    run = _configure(otlp_receiver, monkeypatch)
    pid = await run.serving_helper()
    async with _service(server.url, recorder) as service:
        first = await _calls(service, "first", 1)
        results = first + await _calls(service, "more", 5)
        results += await _calls(service, "big", 1, BIG_METADATA)
        await service.flush()
    assert first[0].attempts == 2, "the scripted 429 hit the first call"

    # The calls crossed as bundles, to the serving helper: no span of llmtrail's was built here.
    assert sum(b.bundles for b in run.batches) == len(results)
    assert sum(b.llmtrail_spans for b in run.batches) == 0
    assert {b.helper_pid for b in run.batches} == {pid}
    assert sum(b.spans for b in run.batches) == sum(r.attempts for r in results), "HTTP spans"

    _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, results))
    _assert_http_spans_nest(otlp_receiver, recorder, results)
    big_span_id = _events(recorder, results[-1:])[0][0].span_id
    big = next(s for s in otlp_receiver.spans if s.span_id == big_span_id)
    assert len(big.attributes) == SpanLimits().max_span_attributes, "limits apply there too"


async def test_the_helper_records_the_genai_metrics_and_this_process_none(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _configure(otlp_receiver, monkeypatch).serving_helper()
    async with _service(mock_server.url, recorder) as service:
        results = await _calls(service, "metrics", 6)
        await service.flush()
        points = _assert_metrics(otlp_receiver, recorder, results)
        # Input and output tokens and the duration: three series, one start time each.
        assert len(_start_times(points)) == 3
        # This process recorded nothing: its own provider (cumulative) exports no point.
        assert await _flush_here_only(otlp_receiver) == []

        # More calls add to the helper's series; still one writer, totals over all calls.
        results += await _calls(service, "again", 3)
        await service.flush()
    _assert_metrics(otlp_receiver, recorder, results)
    assert await _flush_here_only(otlp_receiver) == []


async def test_after_the_helper_is_killed_spans_and_metrics_are_made_here(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_export_process, "_RESTART_AFTER_S", 0.0)  # a new helper at once
    run = _configure(otlp_receiver, monkeypatch)
    first = await run.serving_helper()
    async with _service(mock_server.url, recorder) as service:
        exported = await _calls(service, "exported", 3)
        await service.flush()  # spans and metric points out of the helper
        unexported = await _calls(service, "unexported", 2)
        # Their spans go out through the helper, which records their metric points ...
        await asyncio.to_thread(run.provider.force_flush)
        # ... and dies before exporting those points: they are lost with it (documented).
        killed_at = time.time_ns()
        await _kill(first)

        after_kill = await _calls(service, "after-kill", 3)
        await service.flush()
        assert run.batches[-1].helper_pid is None
        assert run.batches[-1].bundles == len(after_kill)

        # A fresh helper serves spans again; metric points stay in this process.
        second = await run.serving_helper()
        assert second != first
        fresh = await _calls(service, "fresh-helper", 3)
        await service.flush()
        assert run.batches[-1].helper_pid == second and run.batches[-1].bundles == len(fresh)
        # From the first failure on, the points are this process's (the new helper gets none).
        mine = await _flush_here_only(otlp_receiver)
        _assert_totals(_totals(mine), _expected_totals(recorder, after_kill + fresh))
        assert min(p.start_ns for p in mine) > killed_at

    every = exported + unexported + after_kill + fresh
    _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, every))
    _assert_http_spans_nest(otlp_receiver, recorder, every)

    # Shut everything down (the helper's and this process's providers export their last
    # points), then count: nothing doubled, and nothing lost that the rules keep.
    await asyncio.to_thread(telemetry.reset)
    points = _points(otlp_receiver.bodies)
    by_helper = [p for p in points if p.start_ns < killed_at]
    here = [p for p in points if p.start_ns > killed_at]
    assert len(by_helper) + len(here) == len(points)
    _assert_totals(_totals(by_helper), _expected_totals(recorder, exported))
    _assert_totals(_totals(here), _expected_totals(recorder, after_kill + fresh))
    _assert_one_writer(here)  # the second helper recorded none of them


@pytest.mark.parametrize("handover", ["flush", "next_export"])
async def test_calls_finished_while_the_helper_starts_hold_their_points_for_it(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
    helper_gate: Path,
    handover: str,
) -> None:
    run = _configure(otlp_receiver, monkeypatch)
    async with _service(mock_server.url, recorder) as service:
        early = await _calls(service, "early", 4)
        try:
            # The helper is still starting (it waits at the gate): the first export builds
            # and exports the spans here, and holds the metric points for the helper.
            await asyncio.to_thread(run.provider.force_flush)
            assert [(b.bundles, b.helper_pid) for b in run.batches] == [(len(early), None)]
            _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, early))
            assert _points(otlp_receiver.bodies) == []
            assert await _flush_here_only(otlp_receiver) == [], "held, not recorded here"
            assert run.helper.helper_pid is None, "still starting"
        finally:
            helper_gate.touch()
        late: list[GenerationResult] = []
        if handover == "next_export":
            # Once the helper serves, the held points ride with the next bundles.
            await run.serving_helper()
            late = await _calls(service, "late", 2)
            await asyncio.to_thread(run.provider.force_flush)
            assert run.batches[-1].helper_pid is not None
            assert await _flush_here_only(otlp_receiver) == []
        # Else the sink's flush waits for the starting helper, which records them.
        await service.flush()
        assert run.helper.helper_pid is not None
        _assert_metrics(otlp_receiver, recorder, early + late)

        more = await _calls(service, "more", 3)
        await service.flush()
        assert run.batches[-1].helper_pid == run.helper.helper_pid
    every = early + late + more
    _assert_metrics(otlp_receiver, recorder, every)
    assert await _flush_here_only(otlp_receiver) == []
    _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, every))


@dataclass(frozen=True)
class AroundUsersProcessor:
    """Calls before and after a user added their span processor to llmtrail's provider."""

    provider: TracerProvider
    before: list[GenerationResult]
    after: list[GenerationResult]
    batches_after: list[Batch]


async def _around_a_users_processor(
    url: str,
    receiver: Receiver,
    recorder: RecordingSink,
    processor: SpanProcessor,
    monkeypatch: pytest.MonkeyPatch,
) -> AroundUsersProcessor:
    run = _configure(receiver, monkeypatch)
    await run.serving_helper()
    async with _service(url, recorder) as service:
        before = await _calls(service, "before", 2)
        await service.flush()
        assert sum(b.bundles for b in run.batches) == len(before), "bundles until then"
        exported_before = len(run.batches)
        run.provider.add_span_processor(processor)
        after = await _calls(service, "after", 4)
        await service.flush()
    return AroundUsersProcessor(run.provider, before, after, run.batches[exported_before:])


async def test_a_users_span_processor_gets_real_spans_and_the_receiver_the_same_trees(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = InMemorySpanExporter()
    run = await _around_a_users_processor(
        mock_server.url, otlp_receiver, recorder, SimpleSpanProcessor(mine), monkeypatch
    )

    # From then on, real spans: the user's processor sees every span of every call, built
    # in process; the helper is given those spans, and each call's metric points alone.
    seen = list(mine.get_finished_spans())
    assert not any(isinstance(s, CallBundle) for s in seen)
    assert all(isinstance(s, ReadableSpan) for s in seen)
    assert not any(b.bundles for b in run.batches_after)
    assert sum(b.metrics_only for b in run.batches_after) == len(run.after)
    assert sum(b.llmtrail_spans for b in run.batches_after) > 0
    own = [
        s for s in seen if s.instrumentation_scope and s.instrumentation_scope.name == "llmtrail"
    ]
    expected_after = _in_process_spans(run.provider, recorder, run.after)
    assert sorted(map(span_fingerprint, own)) == sorted(map(span_fingerprint, expected_after))
    http = [
        s for s in seen if s.instrumentation_scope and s.instrumentation_scope.name == HTTP_SCOPE
    ]
    assert len(http) == sum(r.attempts for r in run.after)

    every = run.before + run.after
    _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, every))
    _assert_http_spans_nest(otlp_receiver, recorder, every)
    points = _points(otlp_receiver.bodies)
    _assert_totals(_totals(points), _expected_totals(recorder, every))


async def test_a_users_span_processor_added_mid_run_keeps_metrics_in_one_process(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    run = await _around_a_users_processor(
        mock_server.url, otlp_receiver, recorder, processor, monkeypatch
    )
    _assert_metrics(otlp_receiver, recorder, run.before + run.after)


async def test_without_the_export_process_everything_happens_here(
    mock_server_factory: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMTRAIL_OTLP_EXPORT_PROCESS", "0")
    server = await mock_server_factory(
        fault_script=("rate_limit_429",), fault_429_retry_after_s=0.01
    )
    run = _configure(otlp_receiver, monkeypatch)
    assert not isinstance(run.exporter, ProcessSpanExporter)
    async with _service(server.url, recorder) as service:
        results = await _calls(service, "here", 5)
        await service.flush()
    assert sum(r.attempts for r in results) == len(results) + 1, "one scripted 429"

    assert run.batches and not any(b.bundles for b in run.batches)
    expected = _in_process_spans(run.provider, recorder, results)
    assert sum(b.llmtrail_spans for b in run.batches) == len(expected), "built here, as spans"
    workers = [
        p for p in psutil.Process().children() if "llmtrail.telemetry._export_worker" in p.cmdline()
    ]
    assert workers == [], "no export helper"
    _assert_same_trees(otlp_receiver, expected)
    _assert_http_spans_nest(otlp_receiver, recorder, results)

    # The metrics are this process's: its own provider exports all of them, one series each.
    mine = await _flush_here_only(otlp_receiver)
    _assert_totals(_totals(mine), _expected_totals(recorder, results))
    _assert_metrics(otlp_receiver, recorder, results)


async def test_the_otel_environment_route_bundles_too(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone: the service's own sink, provider and helper; closing
    the service exports the spans and the held metric points (through the helper it starts)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", SERVICE_NAME)
    service = _service(mock_server.url, recorder)
    sink = service.sinks[-1]
    assert isinstance(sink, telemetry.TracingSink) and sink.tracer_provider is not None
    route = sink._route
    assert route is not None, "the sink would build spans here"
    exporter = route.exporter
    batches = _watch_exports(monkeypatch, exporter)
    async with service:
        results = await _calls(service, "env", 4)
    assert sum(b.bundles for b in batches) == len(results)
    assert exporter.helper_pid is None, "the sink shut its helper down"

    _assert_same_trees(otlp_receiver, _in_process_spans(sink.tracer_provider, recorder, results))
    _assert_metrics(otlp_receiver, recorder, results)


async def test_calls_beyond_the_span_limits_leave_no_tracer_provider_behind(
    mock_server: Any,
    otlp_receiver: Receiver,  # noqa: F811
    recorder: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_export_process, "_RESTART_AFTER_S", 600.0)  # no new helper
    run = _configure(otlp_receiver, monkeypatch)
    pid = await run.serving_helper()
    async with _service(mock_server.url, recorder) as service:
        # Without a helper, bundles are expanded in this process with spans_of.
        await _kill(pid)
        warm_up = await _calls(service, "warm-up", 1, BIG_METADATA)
        await asyncio.to_thread(run.provider.force_flush)
        before = _live_tracer_providers()
        big = await _calls(service, "big", 5, BIG_METADATA)
        await asyncio.to_thread(run.provider.force_flush)
        after = _live_tracer_providers()
    assert [(b.bundles, b.helper_pid) for b in run.batches] == [(1, None), (len(big), None)]
    _assert_same_trees(otlp_receiver, _in_process_spans(run.provider, recorder, warm_up + big))
    assert after - before == 0, f"{after - before} TracerProviders outlived their call"

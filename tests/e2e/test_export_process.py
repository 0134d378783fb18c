"""The OTLP export helper process: spans cross the pipe intact, reach a real receiver, and
nothing is lost when the helper is not there (starting, killed, unable to start, shut down).
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
from typing import Any

import psutil
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from structlog.testing import capture_logs

from llmtrail.telemetry import _export_process
from llmtrail.telemetry._config import otlp_span_exporter
from llmtrail.telemetry._export_process import ProcessSpanExporter, flatten_spans, rebuild_spans
from tests.e2e.test_tracing_e2e import Receiver, otlp_receiver  # noqa: F401 (fixture)


def _spans() -> list[ReadableSpan]:
    """Spans using every field the OTLP encoder reads, from two providers (two resources)."""
    memory = InMemorySpanExporter()
    limited = TracerProvider(span_limits=SpanLimits(max_span_attributes=2, max_events=1))
    plain = TracerProvider()
    for provider in (limited, plain):
        provider.add_span_processor(SimpleSpanProcessor(memory))
    remote = SpanContext(
        0x1234,
        0x99,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1")]),
    )
    tracer = limited.get_tracer("scope-a", "1.2", schema_url="https://schema/a")
    with tracer.start_as_current_span(
        "parent", context=set_span_in_context(NonRecordingSpan(remote)), kind=SpanKind.CLIENT
    ) as parent:
        parent.set_attributes({"a": 1, "b": [1.5, 2.5], "c": "dropped", "d": True})
        parent.add_event("first", {"k": "v"})
        parent.add_event("dropped")
        parent.set_status(Status(StatusCode.ERROR, "it broke"))
        child_tracer = plain.get_tracer("scope-b")
        with child_tracer.start_as_current_span(
            "child", links=[Link(remote, {"why": "retry"})]
        ) as child:
            child.set_attribute("tokens", (1, 2, 3))
    for provider in (limited, plain):
        provider.shutdown()
    spans = list(memory.get_finished_spans())
    assert spans[1].dropped_attributes == 2 and spans[1].dropped_events == 1
    return spans


def test_flattened_spans_encode_to_the_same_otlp_bytes() -> None:
    spans = _spans()
    wire = pickle.loads(pickle.dumps(flatten_spans(spans)))
    rebuilt = rebuild_spans(*wire)
    assert encode_spans(rebuilt).SerializeToString() == encode_spans(spans).SerializeToString()


def _factory(url: str) -> functools.partial[Any]:
    return functools.partial(otlp_span_exporter, url)


async def _export(exporter: ProcessSpanExporter, spans: list[ReadableSpan]) -> SpanExportResult:
    # export() blocks until the receiver (on this loop) answers: run it off the loop.
    return await asyncio.to_thread(exporter.export, spans)


async def test_spans_go_through_the_helper_process_to_a_real_receiver(
    otlp_receiver: Receiver,  # noqa: F811
) -> None:
    exporter = ProcessSpanExporter(_factory(otlp_receiver.url))
    try:
        assert await asyncio.to_thread(exporter.wait_until_ready)
        pid = exporter.helper_pid
        assert pid is not None and pid != os.getpid()
        helper = psutil.Process(pid)
        assert "llmtrail.telemetry._export_worker" in " ".join(helper.cmdline())
        spans = _spans()
        assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert [s.name for s in otlp_receiver.spans] == [s.name for s in spans]
        # The helper's request body is the one this process would have sent.
        direct = encode_spans(spans).SerializeToString()
        assert otlp_receiver.bodies[-1] == direct
    finally:
        await asyncio.to_thread(exporter.shutdown)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_batches_are_exported_in_process_while_the_helper_is_away(
    otlp_receiver: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_export_process, "_RESTART_AFTER_S", 0.0)
    exporter = ProcessSpanExporter(_factory(otlp_receiver.url))
    spans = _spans()
    try:
        # The first export starts the helper in the background and does not wait for it.
        assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert len(otlp_receiver.spans) == len(spans)
        assert await asyncio.to_thread(exporter.wait_until_ready)
        first = exporter.helper_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(psutil.Process(first).wait, 10)
        with capture_logs() as logs:
            assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert len(otlp_receiver.spans) == 2 * len(spans), "the batch was not lost"
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and "exited" in warnings[0]["reason"]
        # A fresh helper takes over.
        assert await asyncio.to_thread(exporter.wait_until_ready)
        assert exporter.helper_pid not in (None, first)
        assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert len(otlp_receiver.spans) == 3 * len(spans)
    finally:
        await asyncio.to_thread(exporter.shutdown)
    assert exporter.helper_pid is None
    # Like every SDK exporter, a shut-down one refuses (the processor flushed before).
    assert await _export(exporter, spans) is SpanExportResult.FAILURE


async def test_a_helper_that_cannot_build_its_exporter_leaves_export_in_process(
    otlp_receiver: Receiver,  # noqa: F811
) -> None:
    # The helper's factory fails (unknown protocol); the fallback is a working exporter.
    broken = functools.partial(otlp_span_exporter, otlp_receiver.url, "carrier-pigeon")
    exporter = ProcessSpanExporter(broken, fallback=otlp_span_exporter(otlp_receiver.url))
    try:
        with capture_logs() as logs:
            assert not await asyncio.to_thread(exporter.wait_until_ready)
            assert await _export(exporter, _spans()) is SpanExportResult.SUCCESS
        assert len(otlp_receiver.spans) == 2
        assert any("did not start" in e.get("reason", "") for e in logs)
    finally:
        await asyncio.to_thread(exporter.shutdown)


async def test_a_forked_child_uses_its_own_helper_not_its_parents(
    otlp_receiver: Receiver,  # noqa: F811
) -> None:
    exporter = ProcessSpanExporter(_factory(otlp_receiver.url))
    spans = _spans()
    try:
        assert await asyncio.to_thread(exporter.wait_until_ready)
        parent_helper = exporter.helper_pid
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: export through its own helper, report, and leave at once
            code = 1
            try:
                os.close(read_end)
                ready = exporter.wait_until_ready()
                result = exporter.export(spans)
                own = exporter.helper_pid
                os.write(write_end, f"{ready} {result.name} {own}".encode())
                exporter.shutdown()
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        report = os.read(read_end, 200).decode().split()
        os.close(read_end)
        assert os.waitstatus_to_exitcode(status) == 0
        assert report[:2] == ["True", "SUCCESS"]
        assert int(report[2]) not in (parent_helper, pid)
        # The parent's helper was not disturbed by the child.
        assert exporter.helper_pid == parent_helper
        assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert len(otlp_receiver.spans) == 2 * len(spans)
    finally:
        await asyncio.to_thread(exporter.shutdown)


async def test_an_application_package_named_telemetry_does_not_shadow_the_helper(
    otlp_receiver: Receiver,  # noqa: F811
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An application run from a directory holding its own `telemetry` package (and with that
    # directory on PYTHONPATH): the helper must still run llmtrail's code, not theirs.
    theirs = tmp_path / "telemetry"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("raise ImportError('the application telemetry')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    exporter = ProcessSpanExporter(_factory(otlp_receiver.url))
    spans = _spans()
    try:
        assert await asyncio.to_thread(exporter.wait_until_ready)
        assert await _export(exporter, spans) is SpanExportResult.SUCCESS
        assert exporter.helper_pid is not None, "the helper serves"
        assert len(otlp_receiver.spans) == len(spans)
    finally:
        await asyncio.to_thread(exporter.shutdown)

"""One warning per collector outage, and no hammering of a collector that is down
(telemetry._outage): the real OTLP/HTTP exporter against a real receiver on 127.0.0.1 that
answers 503 until it is told to recover, with a fake clock for the probe interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import structlog
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrail.telemetry._outage import OutageAwareExporter, outages

from .servers import serve


@dataclass
class Collector:
    url: str
    arrivals: int = 0
    status: int = 503


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    state = Collector(url="")

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        state.arrivals += 1
        return web.Response(status=state.status, content_type="application/x-protobuf")

    async with serve({"/v1/traces": traces}) as url:
        state.url = f"{url}/v1/traces"
        yield state


def _spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    provider.shutdown()
    return list(memory.get_finished_spans())


async def test_an_outage_is_reported_once_and_the_collector_is_probed_not_hammered(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    outages.forget()
    now = [100.0]
    exporter = OutageAwareExporter(
        # A short export timeout: one attempt and no backoff retry per batch.
        OTLPSpanExporter(endpoint=collector.url, timeout=0.5),
        endpoint=collector.url,
        retry_after_s=5.0,
        clock=lambda: now[0],
    )
    spans = _spans()
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):  # three batches while the collector is down
            result = await asyncio.to_thread(exporter.export, spans)
            assert result is SpanExportResult.FAILURE
        reached = collector.arrivals
        assert reached >= 1
        assert exporter.down and outages.is_down(collector.url)
        # Within the probe interval nothing was sent again: batches were dropped at once.
        now[0] += 4.9
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.FAILURE
        assert collector.arrivals == reached
        # After it, one probe goes out.
        now[0] += 0.2
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.FAILURE
        assert collector.arrivals > reached
        # The collector comes back: the next probe succeeds and ends the outage.
        collector.status = 200
        now[0] += 5.1
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
        assert not exporter.down and not outages.is_down(collector.url)
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert collector.url in warnings[0]["event"] and "export" in str(warnings[0]["reason"])
    infos = [e for e in logs if e["log_level"] == "info"]
    assert [e["event"] for e in infos] == ["OTLP collector reachable again"]
    assert infos[0]["dropped_spans"] == 5 * len(spans)
    # The exporter's own retry and failure lines were kept off the logs.
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    exporter.shutdown()


async def test_other_exporters_log_as_usual(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    OutageAwareExporter(OTLPSpanExporter(endpoint=collector.url, timeout=0.5))  # filter installed
    plain = OTLPSpanExporter(endpoint=collector.url, timeout=0.5)
    caplog.set_level(logging.WARNING)
    assert await asyncio.to_thread(plain.export, _spans()) is SpanExportResult.FAILURE
    assert [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    plain.shutdown()

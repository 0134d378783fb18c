"""``llmtrail traces export`` (telemetry._cli, telemetry._store, telemetry._export)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrail.pipeline import Event
from llmtrail.pipeline._cli import main as cli_main
from llmtrail.storage import open_store_sink
from llmtrail.telemetry import export_traces
from llmtrail.telemetry._cli import parse_time
from llmtrail.telemetry._store import read_events

from . import streams

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T10:30:00Z", datetime(2025, 3, 1, 10, 30, tzinfo=UTC)),
        ("2025-03-01T11:30:00+01:00", datetime(2025, 3, 1, 10, 30, tzinfo=UTC)),
        ("2025-03-01", datetime(2025, 3, 1, tzinfo=UTC)),
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
    ],
)
def test_times_are_iso_8601_or_a_duration_back_from_now(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


def test_a_bad_time_names_the_accepted_forms() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601.*15m"):
        parse_time("yesterday")


def test_export_skips_calls_without_completed_and_counts_traces() -> None:
    calls = [streams.success(), streams.retry_then_success()]
    in_flight = streams.failure().events[:-1]
    exporter = InMemorySpanExporter()
    summary = export_traces([e for c in calls for e in c.events] + in_flight, exporter)
    assert (summary.calls, summary.skipped, summary.traces) == (2, 1, 2)
    assert summary.spans == len(exporter.get_finished_spans()) == 4 + 4


def test_export_takes_each_calls_resource_from_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "the-exporting-shell")
    stored = streams.success()
    stored.events[0].payload["resource"] = {
        "service.name": "checkout",
        "service.version": "1.2",
        "service.instance.id": "pod-7",
    }
    older = streams.failure()  # stored before resources were: only the event's instance
    assert "resource" not in older.events[0].payload
    exporter = InMemorySpanExporter()
    export_traces([*stored.events, *older.events], exporter)
    by_trace = {
        f"{s.context.trace_id:032x}": dict(s.resource.attributes)
        for s in exporter.get_finished_spans()
        if s.context is not None
    }
    new, old = by_trace[stored.trace_id], by_trace[older.trace_id]
    assert (new["service.name"], new["service.version"], new["service.instance.id"]) == (
        "checkout",
        "1.2",
        "pod-7",
    )
    assert (old["service.name"], old["service.instance.id"]) == (
        "the-exporting-shell",
        older.instance,
    )
    # --service-name wins over the stored name.
    exporter.clear()
    export_traces(stored.events, exporter, service_name="renamed")
    assert {s.resource.attributes["service.name"] for s in exporter.get_finished_spans()} == {
        "renamed"
    }


async def _store_with(url: str, builders: list[streams.StreamBuilder]) -> None:
    writer = open_store_sink(url)
    await writer.start()
    for b in builders:
        for event in b.events:
            writer.emit(event)
    await writer.aclose()


def _shifted(b: streams.StreamBuilder, moment: datetime) -> streams.StreamBuilder:
    offset = moment - b.events[0].occurred_at
    b.events = [
        Event(e.call_id, e.seq, e.type, e.occurred_at + offset, e.trace_id, e.span_id, e.payload,
              e.instance, e.event_id)
        for e in b.events
    ]  # fmt: skip
    return b


async def test_a_time_range_selects_calls_by_start_and_keeps_them_whole(sqlite_url: str) -> None:
    early = _shifted(streams.success(), NOW - timedelta(hours=3))
    # Starts inside the range and finishes after its end: exported whole.
    straddling = _shifted(streams.retry_then_success(), NOW - timedelta(seconds=1))
    late = _shifted(streams.failure(), NOW + timedelta(hours=1))
    await _store_with(sqlite_url, [early, straddling, late])

    got = await read_events(sqlite_url, since=NOW - timedelta(hours=1), until=NOW)
    assert {e.call_id for e in got} == {straddling.call_id}
    assert len(got) == len(straddling.events)
    assert {e.call_id for e in await read_events(sqlite_url, until=NOW)} == {
        early.call_id,
        straddling.call_id,
    }
    assert len(await read_events(sqlite_url)) == sum(
        len(b.events) for b in (early, straddling, late)
    )
    assert {e.call_id for e in await read_events(sqlite_url, trace_id=late.trace_id)} == {
        late.call_id
    }
    assert [e.seq for e in await read_events(sqlite_url, call_id=early.call_id)] == list(
        range(len(early.events))
    )


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[int]]]:
    """A real OTLP/HTTP endpoint on 127.0.0.1 counting the spans of each export."""
    counts: list[int] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        counts.append(sum(len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", counts
    finally:
        await runner.cleanup()


async def test_cli_prints_what_it_exported_and_what_it_skipped(
    sqlite_url: str,
    receiver: tuple[str, list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, counts = receiver
    unfinished = streams.failure()
    unfinished.events.pop()
    await _store_with(sqlite_url, [streams.success(), streams.cancelled_in_flight(), unfinished])

    argv = ["traces", "export", "--store", sqlite_url, "--endpoint", url]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == (
        "exported 6 spans in 2 traces (2 completed calls); "
        "skipped 1 calls without a completed event"
    )
    assert sum(counts) == 6

    assert await asyncio.to_thread(cli_main, [*argv, "--call", "nope", "--json"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        '{"spans": 0, "traces": 0, "calls": 0, "skipped": 0}'
    )


def test_cli_rejects_an_empty_range_and_a_missing_store(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["traces", "export", "--since", "1h", "--until", "2h"]) == 2
    assert "--until" in capsys.readouterr().err
    missing = "sqlite+aiosqlite:////nonexistent/dir/llmtrail.db"
    assert cli_main(["traces", "export", "--store", missing]) in (1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "llmtrail traces" in err

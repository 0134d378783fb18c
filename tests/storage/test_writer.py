"""EventWriter behaviours beyond the backend contract: lifecycle, threads, URLs, batching."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from llmtrail.pipeline import ConfigurationError, EventType
from llmtrail.pipeline.typing import EventSink, UsageHistory
from llmtrail.storage import (
    EventStore,
    StoreClosedError,
    StoreConfigError,
    StoreError,
    create_engine,
    open_store_sink,
)
from llmtrail.storage._engine import normalize_store_url
from tests.storage.test_store_contract import (
    INSTANCE,
    call_events,
    eventually,
    read_all,
    started_writer,
    write_lock_held,
)

# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_plain_urls_map_to_the_async_drivers(url: str, driver: str) -> None:
    assert normalize_store_url(url).drivername == driver


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://user:hunter2@host/db", "unsupported driver 'mysql'"),
        ("postgresql+psycopg2://user:hunter2@host/db", "unsupported driver"),
        ("not a url", "malformed"),
        ("", "empty"),
        ("postgresql://user:hunter2@host", "names no database"),
    ],
)
def test_a_bad_store_url_is_refused_with_the_fix_and_no_secret(url: str, says: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        open_store_sink(url)  # no event loop needed, nothing opened
    message = str(info.value)
    assert says in message
    assert "hunter2" not in message
    assert isinstance(info.value, ConfigurationError)
    if url:
        assert "sqlite+aiosqlite:///" in message and "postgresql+asyncpg://" in message


def test_building_the_sink_creates_no_file(tmp_path: Path) -> None:
    open_store_sink(f"sqlite:///{tmp_path / 'later.db'}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"max_queue": 0},
        {"batch_size": 0},
        {"max_queue": True},
        {"store_timeout_s": 0},
        {"store_timeout_s": True},
    ],
)
def test_bad_writer_options_are_refused(sqlite_url: str, bad: dict[str, Any]) -> None:
    with pytest.raises(StoreConfigError, match=next(iter(bad))):
        open_store_sink(sqlite_url, **bad)


# -- lifecycle ------------------------------------------------------------------------


async def test_the_writer_is_an_event_sink_and_a_usage_history(sqlite_url: str) -> None:
    writer = open_store_sink(sqlite_url)
    assert isinstance(writer, EventSink)
    assert isinstance(writer, UsageHistory)


async def test_events_emitted_before_start_are_written_after_it(sqlite_url: str) -> None:
    events = call_events("early")
    writer = open_store_sink(sqlite_url, instance=INSTANCE)
    assert all(writer.emit(e) for e in events)
    assert writer.pending == len(events)

    await writer.start()
    await writer.flush()
    await writer.aclose()

    assert [s.event.event_id for s in await read_all(sqlite_url)] == [e.event_id for e in events]


async def test_aclose_of_a_never_started_writer_writes_what_was_emitted(sqlite_url: str) -> None:
    events = call_events("unstarted")
    writer = open_store_sink(sqlite_url, instance=INSTANCE)
    for event in events:
        writer.emit(event)

    await writer.aclose()

    assert len(await read_all(sqlite_url)) == len(events)


async def test_aclose_is_idempotent_and_emit_after_it_raises(sqlite_url: str) -> None:
    writer = await started_writer(sqlite_url)
    await writer.aclose()
    await writer.aclose()
    with pytest.raises(StoreClosedError, match="closed"):
        writer.emit(call_events("late")[0])


async def test_concurrent_acloses_both_return_after_the_events_are_written(
    sqlite_url: str,
) -> None:
    writer = await started_writer(sqlite_url)
    for event in call_events("c"):
        writer.emit(event)
    await asyncio.gather(writer.aclose(), writer.aclose())
    assert writer.written == len(call_events("c"))


async def in_a_thread_with_its_own_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` as the sync path would: in another thread, under its own event loop."""
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive() and not failures, failures


async def test_flush_and_emit_from_a_thread_with_its_own_loop(sqlite_url: str) -> None:
    writer = await started_writer(sqlite_url)
    events = call_events("threaded")

    async def main() -> None:
        for event in events:
            writer.emit(event)
        await writer.flush()  # runs on the writer's loop, awaited from this one

    await in_a_thread_with_its_own_loop(main)
    async with await EventStore.open(sqlite_url) as store:
        stored = await store.events_for_call("threaded")
    await writer.aclose()
    assert [s.event.event_id for s in stored] == [e.event_id for e in events]


async def test_aclose_from_a_thread_with_its_own_loop_writes_everything(sqlite_url: str) -> None:
    writer = await started_writer(sqlite_url)
    events = [e for i in range(20) for e in call_events(f"closing{i}")]

    async def main() -> None:
        for event in events:
            writer.emit(event)
        await writer.aclose()  # on the writer's loop, awaited from this one

    await in_a_thread_with_its_own_loop(main)
    assert writer.written == len(events)
    assert len(await read_all(sqlite_url)) == len(events)


async def test_emits_from_a_thread_before_start_are_kept(sqlite_url: str) -> None:
    writer = open_store_sink(sqlite_url)
    events = call_events("pre")
    thread = threading.Thread(target=lambda: [writer.emit(e) for e in events])
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    await writer.start()
    await writer.aclose()
    assert writer.written == len(events)


async def test_instance_is_the_writers_unless_the_event_names_one(sqlite_url: str) -> None:
    mine, theirs = call_events("i", types=(EventType.TRACE_CREATED, EventType.SENT))
    writer = await started_writer(sqlite_url)
    writer.emit(mine)
    writer.emit(dataclasses.replace(theirs, instance="other:9"))
    await writer.aclose()
    assert [s.event.instance for s in await read_all(sqlite_url)] == [INSTANCE, "other:9"]


async def test_payload_values_json_cannot_spell_are_stored_as_text(store_url: str) -> None:
    event = call_events("odd", types=(EventType.TRACE_CREATED,))[0]
    odd = dataclasses.replace(
        event,
        payload={"cost": Decimal("0.10"), "nan": float("nan"), "inf": float("inf"), "ok": 1.5},
    )
    writer = await started_writer(store_url)
    writer.emit(odd)
    await writer.aclose()
    (stored,) = await read_all(store_url)
    assert stored.event.payload == {"cost": "0.10", "nan": "nan", "inf": "inf", "ok": 1.5}


@dataclasses.dataclass
class _Point:
    x: int


async def test_payloads_are_stored_as_the_json_module_writes_them(store_url: str) -> None:
    # The writer encodes with orjson and falls back to the json module (default=str) for
    # what orjson would write differently: each payload must read back as json writes it.
    import json
    import uuid
    from datetime import UTC, date, datetime

    import numpy as np

    at = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    payloads: list[dict[str, Any]] = [
        {"at": at, "day": date(2025, 1, 2), "id": ident, "point": _Point(1), "cost": Decimal("1")},
        {"np": np.float64(0.25), "big": 2**70, "ints": (1, 2), "flag": True, "none": None},
        {"deep": {"list": [1.5, None, {"nan": float("nan")}]}, "null": None},
        {"-inf": float("-inf"), "text": "naïve ✓", "nul": "a\x00b", "esc": "\ue000"},
        {1: "int key", "nested": {"k": [None]}},
    ]
    expected = [json.loads(json.dumps(p, default=str)) for p in payloads]
    expected[2]["deep"]["list"][2]["nan"] = "nan"
    expected[3]["-inf"] = "-inf"
    events = call_events("enc", types=(EventType.TRACE_CREATED,) * len(payloads))
    writer = await started_writer(store_url)
    for event, payload in zip(events, payloads, strict=True):
        writer.emit(dataclasses.replace(event, payload=payload))
    await writer.aclose()
    assert writer.written == len(payloads) and writer.rejected == 0
    assert [s.event.payload for s in await read_all(store_url)] == expected


async def test_occurred_at_of_any_shape_is_stored_as_the_same_utc_instant(store_url: str) -> None:
    import re
    from datetime import UTC, datetime, timedelta, timezone

    times = [
        datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),  # the whole second: no fraction in ISO
        datetime(2025, 1, 2, 5, 4, 5, 999999, tzinfo=timezone(timedelta(hours=2))),
        datetime(2025, 1, 2, 3, 4, 5, 500000),  # naive: taken as UTC
    ]
    events = call_events("at", types=(EventType.TRACE_CREATED,) * len(times))
    writer = await started_writer(store_url)
    for event, at in zip(events, times, strict=True):
        writer.emit(dataclasses.replace(event, occurred_at=at))
    await writer.aclose()
    stored = [s.event.occurred_at for s in await read_all(store_url)]
    assert stored == [at if at.tzinfo else at.replace(tzinfo=UTC) for at in times]
    assert all(at.tzinfo is not None for at in stored)
    if store_url.startswith("sqlite"):
        # SQLAlchemy's own layout for SQLite, so that `since`/`until` compare as text.
        with sqlite3.connect(make_url(store_url).database or "") as connection:
            texts = [
                row[0]
                for row in connection.execute("SELECT occurred_at FROM events ORDER BY position")
            ]
        assert texts == [
            "2025-01-02 03:04:05.000006",
            "2025-01-02 03:04:05.000000",
            "2025-01-02 03:04:05.999999",
            "2025-01-02 03:04:05.500000",
        ]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", t) for t in texts)


async def test_a_payload_json_cannot_hold_is_kept_as_text_and_reported(sqlite_url: str) -> None:
    good, bad, after = call_events("p", types=(EventType.TRACE_CREATED,) * 3)
    circular: dict[str, Any] = {"a": 1}
    circular["self"] = circular
    bad = dataclasses.replace(bad, payload={("tuple", "key"): 1, "loop": circular})
    writer = await started_writer(sqlite_url)
    with capture_logs() as logs:
        for event in (good, bad, after):
            writer.emit(event)
        await writer.aclose()

    stored = {s.event.event_id: s.event.payload for s in await read_all(sqlite_url)}
    assert set(stored) == {good.event_id, bad.event_id, after.event_id}
    assert "unserialisable_payload" in stored[bad.event_id]
    assert [line["event_id"] for line in logs if line["log_level"] == "error"] == [bad.event_id]


async def test_an_event_the_store_cannot_hold_is_refused_and_the_rest_written(
    sqlite_url: str,
) -> None:
    good, broken, after = call_events("v", types=(EventType.TRACE_CREATED,) * 3)
    broken = dataclasses.replace(broken, occurred_at=None)  # type: ignore[arg-type]
    writer = await started_writer(sqlite_url)
    with capture_logs() as logs:
        for event in (good, broken, after):
            writer.emit(event)
        await writer.flush()  # returns: the refused event counts as done
    await writer.aclose()

    assert [s.event.event_id for s in await read_all(sqlite_url)] == [
        good.event_id,
        after.event_id,
    ]
    assert (writer.written, writer.rejected) == (2, 1)
    assert len([line for line in logs if line["log_level"] == "error"]) == 1


# -- how batches are written ----------------------------------------------------------


async def test_one_batch_is_one_multi_row_insert_in_one_immediate_transaction(
    sqlite_url: str,
) -> None:
    events = [e for i in range(10) for e in call_events(f"b{i}")]  # 70 events
    writer = await started_writer(sqlite_url, batch_size=1_000)
    statements: list[str] = []
    # What SQLite itself executes on the writer's connection (the driver's trace callback).
    connection = writer._inserter._connection  # noqa: SLF001
    assert connection is not None
    raw = await connection.get_raw_connection()
    await raw.driver_connection.set_trace_callback(  # type: ignore[union-attr]
        lambda sql: statements.append(" ".join(sql.split()[:3]).rstrip(";"))
    )
    for event in events:
        writer.emit(event)  # no await in between: drained as one batch
    await writer.aclose()

    writes = [s for s in statements if not s.startswith(("SELECT", "PRAGMA"))]
    assert writes == ["BEGIN IMMEDIATE", "INSERT INTO events", "COMMIT"]
    assert writer.written == len(events)


async def test_a_full_batch_limit_splits_the_queue_into_several_inserts(sqlite_url: str) -> None:
    events = [e for i in range(10) for e in call_events(f"s{i}")]
    writer = open_store_sink(sqlite_url, batch_size=16)
    for event in events:
        writer.emit(event)
    await writer.start()
    await writer.aclose()
    assert [s.event.event_id for s in await read_all(sqlite_url)] == [e.event_id for e in events]


async def test_sqlite_store_runs_in_wal_mode(sqlite_url: str) -> None:
    writer = await started_writer(sqlite_url)
    await writer.aclose()
    path = make_url(sqlite_url).database
    assert path is not None
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
async def test_postgresql_batches_wait_for_the_append_advisory_lock(pg_url: str) -> None:
    writer = await started_writer(pg_url, busy_timeout_ms=50, max_backoff_s=0.05)
    holder = await asyncpg.connect(
        make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    )
    await holder.execute("SELECT pg_advisory_lock($1)", 0x6C6C6D7472616C01)
    try:
        for event in call_events("locked"):
            writer.emit(event)
        await eventually(lambda: writer.failed_attempts >= 2, "the batch waits for the lock")
        assert writer.written == 0
    finally:
        await holder.execute("SELECT pg_advisory_unlock($1)", 0x6C6C6D7472616C01)
        await holder.close()
    await writer.aclose()
    assert writer.written == len(call_events("locked"))


@pytest.mark.postgres
async def test_writer_reconnects_after_its_connections_are_terminated(pg_url: str) -> None:
    writer = await started_writer(pg_url, max_backoff_s=0.05)
    before, after = call_events("before"), call_events("after")
    for event in before:
        writer.emit(event)
    await writer.flush()
    admin = await asyncpg.connect(
        make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    )
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'llmtrail writer'"
        )
    finally:
        await admin.close()
    assert killed >= 1

    with capture_logs() as logs:
        for event in after:
            writer.emit(event)
        async with asyncio.timeout(30):
            await writer.flush()
    await writer.aclose()

    assert len(await read_all(pg_url)) == len(before) + len(after)
    assert [line["log_level"] for line in logs if "available" in line["event"]] == [
        "warning",
        "info",
    ]


@pytest.mark.postgres
async def test_a_row_postgresql_refuses_is_not_retried_forever(pg_url: str) -> None:
    good, bad = call_events("ok", types=(EventType.TRACE_CREATED,) * 2)
    bad = dataclasses.replace(bad, call_id="nul\x00id")  # TEXT cannot hold U+0000
    writer = await started_writer(pg_url, max_backoff_s=0.05)
    with capture_logs() as logs:
        writer.emit(good)
        writer.emit(bad)
        async with asyncio.timeout(30):
            await writer.flush()
    await writer.aclose()

    assert [s.event.event_id for s in await read_all(pg_url)] == [good.event_id]
    assert (writer.written, writer.rejected, writer.failed_attempts) == (1, 1, 0)
    assert [line["event_id"] for line in logs if line["log_level"] == "error"] == [bad.event_id]


async def test_aclose_given_up_during_an_outage_reports_the_unwritten_events(
    sqlite_url: str,
) -> None:
    writer = await started_writer(sqlite_url, busy_timeout_ms=20, max_backoff_s=0.05)
    events = call_events("stuck")
    with capture_logs() as logs:
        async with write_lock_held(sqlite_url):
            for event in events:
                writer.emit(event)
            await eventually(lambda: writer.failed_attempts >= 1, "the batch failed once")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await writer.aclose()
    errors = [line for line in logs if line["log_level"] == "error"]
    assert errors and errors[-1]["unstored"] == len(events)
    with pytest.raises(StoreClosedError):
        writer.emit(events[0])


async def test_flush_and_aclose_give_up_after_store_timeout_s_with_one_line_each(
    sqlite_url: str,
) -> None:
    writer = await started_writer(
        sqlite_url, busy_timeout_ms=20, max_backoff_s=0.05, store_timeout_s=0.3
    )
    events = call_events("stuck")
    with capture_logs() as logs:
        async with write_lock_held(sqlite_url):
            for event in events:
                writer.emit(event)
            async with asyncio.timeout(30):  # a hang guard: the writer's own bound is 0.3 s
                await writer.flush()
                assert writer.pending == len(events)  # kept queued
                await writer.aclose()
    lines = [line for line in logs if line["log_level"] in ("warning", "error")]
    flushed, closed = lines[-2:]
    assert flushed["event"].startswith("event store flush gave up after store_timeout_s=0.3s")
    assert flushed["unstored"] == closed["unstored"] == len(events)
    assert closed["event"].startswith(f"event writer closed with {len(events)} events not stored")
    assert "database is locked" in closed["event"]  # why: the store's own error


async def test_recent_sends_needs_a_started_writer(sqlite_url: str) -> None:
    from datetime import UTC, datetime

    with pytest.raises(StoreError, match="start"):
        await open_store_sink(sqlite_url).recent_sends(datetime.now(UTC))


async def test_sqlite_page_cache_and_checkpoint_interval_are_set_per_engine(
    sqlite_url: str,
) -> None:
    from sqlalchemy import text

    tuned = create_engine(sqlite_url, cache_size_kib=4_096, wal_autocheckpoint_pages=7_000)
    plain = create_engine(sqlite_url)
    try:
        for engine, cache, pages in ((tuned, -4_096, 7_000), (plain, -2_000, 1_000)):
            async with engine.connect() as connection:
                assert await connection.scalar(text("PRAGMA cache_size")) == cache
                assert await connection.scalar(text("PRAGMA wal_autocheckpoint")) == pages
    finally:
        await tuned.dispose()
        await plain.dispose()


async def test_an_engine_for_a_missing_file_is_refused_when_it_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="no event store"):
        create_engine(f"sqlite:///{tmp_path / 'absent.db'}", must_exist=True)

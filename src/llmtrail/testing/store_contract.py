"""The event store's contract, run once per backend (``store_url``: SQLite, then PostgreSQL).

One suite, several backends (eventsourcing's pattern): whatever the application may rely on
is stated here and must hold on both. It ships with llmtrail so an application can run the same
contract against its own database: in a test module,

    pytest_plugins = ["llmtrail.testing.fixtures"]
    from llmtrail.testing.store_contract import *  # noqa: F403 (the contract's tests)

and override the ``store_url`` fixture to yield a fresh, empty store URL of its own (its
PostgreSQL, say). The suite needs the ``test`` extra (pytest, pytest-asyncio) and, for
PostgreSQL, the ``postgres`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from llmtrail.pipeline import Event, EventType
from llmtrail.storage import EventStore, EventWriter, StoredEvent, open_store_sink

INSTANCE = "test-host:1"
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

LIFECYCLE = (
    EventType.TRACE_CREATED,
    EventType.GATE_WAIT,
    EventType.GATE_WAIT,
    EventType.SEMAPHORE_ACQUIRED,
    EventType.SENT,
    EventType.RECEIVED,
    EventType.COMPLETED,
)


def call_events(
    call_id: str,
    *,
    trace_id: str | None = None,
    types: Iterable[EventType] = LIFECYCLE,
    start: datetime = T0,
    reserved_tokens: int = 100,
) -> list[Event]:
    """One call's stream: contiguous seq, one microsecond apart, payloads shaped like real ones."""
    out = []
    attempt = 0
    for seq, kind in enumerate(types):
        payload: dict[str, Any] = {"n": seq}
        if kind is EventType.TRACE_CREATED:
            payload = {"operation_name": "op", "model": "m", "reserved_tokens": reserved_tokens}
        elif kind is EventType.SENT:
            attempt += 1
            payload = {"attempt": attempt}
        elif kind is EventType.RECEIVED:
            payload = {"attempt": attempt, "latency_s": 0.25, "rate_limits": {"a": "1"}}
        elif kind is EventType.COMPLETED:
            payload = {"outcome": "succeeded", "cost_usd": "0.0001", "error_type": None}
        out.append(
            Event(
                call_id=call_id,
                seq=seq,
                type=kind,
                occurred_at=start + timedelta(microseconds=seq),
                trace_id=trace_id or f"{call_id:0>32}"[-32:],
                span_id="00000000000000aa",
                payload=payload,
            )
        )
    return out


def interleave(*streams: list[Event]) -> list[Event]:
    """Round-robin the streams, as concurrent calls emit them."""
    out: list[Event] = []
    for i in range(max(len(s) for s in streams)):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def as_stored(event: Event) -> Event:
    """What the store gives back for an emitted event: the writer fills in ``instance``."""
    return dataclasses.replace(event, instance=event.instance or INSTANCE)


async def started_writer(url: str, **options: Any) -> EventWriter:
    writer = open_store_sink(url, instance=INSTANCE, **options)
    await writer.start()
    return writer


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[EventStore]:
    store = await EventStore.open(url)
    try:
        yield store
    finally:
        await store.aclose()


async def read_all(url: str) -> list[StoredEvent]:
    async with opened(url) as store:
        return [stored async for stored in store.scan(page_size=500)]


async def eventually(condition: Callable[[], bool], what: str, *, timeout_s: float = 20) -> None:
    """Wait for a condition a real database brings about (a lock timeout, a reconnect)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


@contextlib.asynccontextmanager
async def write_lock_held(url: str) -> AsyncIterator[None]:
    """Another connection holds the write lock: SQLite ``BEGIN IMMEDIATE``, PostgreSQL an
    ``ACCESS EXCLUSIVE`` lock on the events table."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        assert parsed.database is not None
        blocker = sqlite3.connect(parsed.database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    else:
        connection = await asyncpg.connect(
            parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        )
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
            await connection.close()


def emit_all(writer: EventWriter, events: Iterable[Event]) -> None:
    for event in events:
        writer.emit(event)


# -- ordering, paging, idempotency, durability -------------------------------------------


async def test_events_come_back_in_emit_order_with_increasing_positions(store_url: str) -> None:
    emitted = interleave(*(call_events(f"call{i}") for i in range(3)))
    writer = await started_writer(store_url)
    emit_all(writer, emitted)
    await writer.flush()
    await writer.aclose()

    stored = await read_all(store_url)

    assert [s.event for s in stored] == [as_stored(e) for e in emitted]
    positions = [s.position for s in stored]
    assert positions == sorted(set(positions))
    assert all(s.event.occurred_at.tzinfo is not None for s in stored)
    assert stored[0].event.occurred_at == T0  # microseconds and zone survive the round trip


async def test_read_pages_with_a_position_cursor_without_gaps_or_repeats(store_url: str) -> None:
    emitted = [e for i in range(35) for e in call_events(f"c{i}")]  # 245 events
    writer = await started_writer(store_url)
    emit_all(writer, emitted)
    await writer.aclose()

    async with opened(store_url) as store:
        pages: list[list[StoredEvent]] = []
        cursor = 0
        while page := await store.read(after_position=cursor, limit=100):
            pages.append(page)
            cursor = page[-1].position
        everything = await store.read(0, limit=10_000)

    assert [len(p) for p in pages] == [100, 100, 45]
    assert [s for p in pages for s in p] == everything
    assert [s.event.event_id for s in everything] == [e.event_id for e in emitted]


async def test_the_same_event_appended_again_is_stored_once(store_url: str) -> None:
    first, second = call_events("dup", types=(EventType.TRACE_CREATED, EventType.SENT))
    writer = await started_writer(store_url)
    writer.emit(first)
    writer.emit(first)  # same batch
    await writer.flush()
    writer.emit(first)  # a later batch, as a retried batch would
    writer.emit(second)
    await writer.flush()
    other = await started_writer(store_url)  # another process appending it again
    other.emit(first)
    await other.aclose()
    await writer.aclose()

    stored = await read_all(store_url)

    assert [s.event.event_id for s in stored] == [first.event_id, second.event_id]


async def test_flushed_events_are_durable_for_a_new_engine(store_url: str) -> None:
    emitted = call_events("durable")
    writer = await started_writer(store_url)
    emit_all(writer, emitted)
    await writer.flush()

    async with opened(store_url) as fresh:  # its own engine and connections
        stored = await fresh.events_for_call("durable")
    await writer.aclose()

    assert [s.event for s in stored] == [as_stored(e) for e in emitted]


async def test_events_emitted_from_many_threads_are_all_stored_in_per_thread_order(
    store_url: str,
) -> None:
    writer = await started_writer(store_url)
    per_thread = {t: [e for i in range(25) for e in call_events(f"t{t}c{i}")] for t in range(8)}
    go = threading.Barrier(8)

    def produce(events: list[Event]) -> None:
        go.wait()
        for event in events:
            writer.emit(event)

    threads = [threading.Thread(target=produce, args=(ev,)) for ev in per_thread.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join, 30)
    await writer.flush()
    await writer.aclose()

    stored = await read_all(store_url)
    total = sum(len(v) for v in per_thread.values())
    assert writer.emitted == total
    assert len(stored) == total
    position = {s.event.event_id: s.position for s in stored}
    for events in per_thread.values():
        positions = [position[e.event_id] for e in events]
        assert positions == sorted(positions)


# -- backpressure and outages ------------------------------------------------------------


async def test_a_full_queue_makes_callers_wait_and_loses_nothing(store_url: str) -> None:
    writer = await started_writer(store_url, max_queue=5)
    events = [e for i in range(30) for e in call_events(f"bp{i}")]

    # No await between emits, so nothing drains: the fifth event reaches the mark.
    accepted = [writer.emit(e) for e in events[:5]]
    assert accepted == [True, True, True, True, False]
    assert writer.pending == 5

    await writer.wait_for_room()
    assert writer.pending < 5
    refused = 0
    for event in events[5:]:
        if not writer.emit(event):
            refused += 1
            await writer.wait_for_room()
    await writer.aclose()

    assert refused > 0
    stored = await read_all(store_url)
    assert [s.event.event_id for s in stored] == [e.event_id for e in events]


async def test_a_locked_store_is_retried_nothing_is_lost_and_one_warning_is_logged(
    store_url: str,
) -> None:
    writer = await started_writer(store_url, busy_timeout_ms=50, max_backoff_s=0.05)
    before = call_events("before")
    emit_all(writer, before)
    await writer.flush()
    during = [e for i in range(20) for e in call_events(f"during{i}")]

    with capture_logs() as logs:
        async with write_lock_held(store_url):
            accepted = [writer.emit(e) for e in during]
            await eventually(lambda: writer.failed_attempts >= 3, "three failed attempts")
            assert writer.in_outage
        async with asyncio.timeout(30):
            await writer.flush()
    await writer.aclose()

    assert all(accepted)  # calls go on during the outage, below the queue bound
    stored = await read_all(store_url)
    assert [s.event.event_id for s in stored] == [e.event_id for e in before + during]
    warnings = [line for line in logs if line["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    assert "unavailable" in warnings[0]["event"]
    assert "lock" in warnings[0]["error"].lower()
    recovered = [line for line in logs if "available again" in line["event"]]
    assert len(recovered) == 1


async def test_concurrent_followers_never_skip_a_position_while_writers_append(
    store_url: str,
) -> None:
    writers = [await started_writer(store_url) for _ in range(3)]
    per_writer = 240
    total = per_writer * len(writers)

    async def produce(index: int, writer: EventWriter) -> None:
        events = [
            e
            for i in range(per_writer // 8)
            for e in call_events(f"w{index}c{i}", types=LIFECYCLE + (EventType.UNMARKED,))
        ]
        for start in range(0, len(events), 16):
            emit_all(writer, events[start : start + 16])
            await asyncio.sleep(0)  # let the other writers' batches interleave with ours
        await writer.flush()

    async def follow(store: EventStore, seen: list[int]) -> None:
        async for stored in store.follow(0, poll_s=0.005):
            seen.append(stored.position)
            if len(seen) == total:
                return

    seen_by: list[list[int]] = [[], []]
    async with opened(store_url) as first, opened(store_url) as second:
        followers = [
            asyncio.create_task(follow(first, seen_by[0])),
            asyncio.create_task(follow(second, seen_by[1])),
        ]
        async with asyncio.timeout(60):
            await asyncio.gather(*(produce(i, w) for i, w in enumerate(writers)))
        # A follower that skipped a position never reaches `total`: stop it and compare.
        _, late = await asyncio.wait(followers, timeout=15)
        for task in late:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    for writer in writers:
        await writer.aclose()

    final = [s.position for s in await read_all(store_url)]
    assert len(final) == total
    for seen in seen_by:
        assert seen == final


# -- reading -------------------------------------------------------------------------------


async def test_events_for_call_and_for_trace(store_url: str) -> None:
    shared_trace = "ab" * 16
    a = call_events("a", trace_id=shared_trace)
    b = call_events("b")
    c = call_events("c", trace_id=shared_trace)  # a second call in the same trace
    writer = await started_writer(store_url)
    emit_all(writer, interleave(a, b, c))
    await writer.aclose()

    async with opened(store_url) as store:
        for_call = await store.events_for_call("b")
        for_trace = await store.events_for_trace(shared_trace)
        nothing = await store.events_for_call("missing")

    assert [s.event for s in for_call] == [as_stored(e) for e in b]
    assert {s.call_id for s in for_trace} == {"a", "c"}
    assert [s.position for s in for_trace] == sorted(s.position for s in for_trace)
    assert len(for_trace) == len(a) + len(c)
    assert nothing == []


async def test_incomplete_calls_are_those_without_a_completed_event(store_url: str) -> None:
    done = call_events("done")
    open_call = call_events("open", types=LIFECYCLE[:5])
    died = call_events("died", types=LIFECYCLE[:1])
    writer = await started_writer(store_url)
    emit_all(writer, interleave(done, open_call, died))
    await writer.aclose()

    async with opened(store_url) as store:
        incomplete = await store.incomplete_calls()

    assert [(s.call_id, s.type) for s in incomplete] == [
        ("open", EventType.TRACE_CREATED),
        ("died", EventType.TRACE_CREATED),
    ]


async def test_recent_sends_gives_reserved_tokens_for_first_attempts_and_zero_for_retries(
    store_url: str,
) -> None:
    now = datetime.now(UTC)
    retried = call_events(
        "retried",
        types=(
            EventType.TRACE_CREATED,
            EventType.SENT,
            EventType.ATTEMPT_FAILED,
            EventType.SENT,
            EventType.RECEIVED,
        ),
        start=now - timedelta(seconds=5),
        reserved_tokens=300,
    )
    old = call_events("old", start=now - timedelta(minutes=10), reserved_tokens=50)
    single = call_events("single", start=now - timedelta(seconds=2), reserved_tokens=70)
    writer = await started_writer(store_url)
    emit_all(writer, interleave(old, retried, single))
    await writer.flush()

    sends = await writer.recent_sends(now - timedelta(seconds=60))
    await writer.aclose()

    sent_at = [e.occurred_at for e in retried if e.type is EventType.SENT]
    assert sends == [
        (sent_at[0], 300),
        (sent_at[1], 0),
        (next(e.occurred_at for e in single if e.type is EventType.SENT), 70),
    ]


async def test_query_combines_type_time_call_and_limit_filters(store_url: str) -> None:
    early = call_events("early", start=T0)
    late = call_events("late", start=T0 + timedelta(hours=1))
    writer = await started_writer(store_url)
    emit_all(writer, early + late)
    await writer.aclose()

    async with opened(store_url) as store:
        sent = await store.query(type="sent")
        two_types = await store.query(type=["sent", "completed"], call_id="late")
        since_late = await store.query(since=T0 + timedelta(hours=1))
        # The same instant written in another zone selects the same events.
        since_late_cet = await store.query(
            since=(T0 + timedelta(hours=1)).astimezone(timezone(timedelta(hours=2)))
        )
        until_late = await store.query(until=T0 + timedelta(hours=1))
        first_three = await store.query(limit=3)

    assert [s.call_id for s in sent] == ["early", "late"]
    assert [s.type for s in two_types] == [EventType.SENT, EventType.COMPLETED]
    assert {s.call_id for s in since_late} == {"late"} and len(since_late) == len(late)
    assert since_late_cet == since_late
    assert {s.call_id for s in until_late} == {"early"} and len(until_late) == len(early)
    assert [s.event.event_id for s in first_three] == [e.event_id for e in early[:3]]


async def test_an_event_reusing_a_taken_seq_is_refused_loudly_and_the_rest_are_written(
    store_url: str,
) -> None:
    good = call_events("x", types=(EventType.TRACE_CREATED, EventType.SENT))
    clash = dataclasses.replace(good[1], event_id="f" * 32)  # same (call_id, seq), new id
    after = call_events("y", types=(EventType.TRACE_CREATED,))
    writer = await started_writer(store_url)

    with capture_logs() as logs:
        emit_all(writer, [*good, clash, *after])
        await writer.flush()
    await writer.aclose()

    stored = await read_all(store_url)
    assert [s.event.event_id for s in stored] == [e.event_id for e in good + after]
    assert writer.rejected == 1
    errors = [line for line in logs if line["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["event_id"] == "f" * 32


async def test_payload_text_with_nul_characters_reads_back_exactly(store_url: str) -> None:
    first, second = call_events("nul", types=(EventType.TRACE_CREATED, EventType.RECEIVED))
    with_nul = dataclasses.replace(
        first,
        payload={
            "metadata": {"n": "a\x00b", "k\x00": "v"},
            "input": [{"role": "user", "content": "nul \x00 inside \ue000 and \ue0000"}],
        },
    )
    writer = await started_writer(store_url)
    with capture_logs() as logs:
        writer.emit(with_nul)
        writer.emit(second)
        async with asyncio.timeout(30):
            await writer.flush()
    await writer.aclose()

    stored = await read_all(store_url)
    assert [s.event for s in stored] == [as_stored(with_nul), as_stored(second)]
    assert not [line for line in logs if line["log_level"] in ("warning", "error")]


async def test_incomplete_summaries_name_the_last_event_the_attempt_and_whether_it_was_sent(
    store_url: str,
) -> None:
    sent = call_events("sent", types=LIFECYCLE[:5])
    queued = call_events("queued", types=LIFECYCLE[:3])
    writer = await started_writer(store_url)
    emit_all(writer, interleave(call_events("done"), sent, queued))
    await writer.aclose()

    async with opened(store_url) as store:
        found = {c.call_id: c for c in await store.incomplete_summaries()}

    assert set(found) == {"sent", "queued"}
    assert (found["sent"].last_event, found["sent"].sent) == (LIFECYCLE[4], True)
    assert found["sent"].attempt == 1
    assert (found["queued"].last_event, found["queued"].sent) == (LIFECYCLE[2], False)
    assert found["sent"].to_dict()["last_event"] == str(LIFECYCLE[4])


async def test_a_durable_future_is_done_only_once_its_events_are_committed(
    store_url: str,
) -> None:
    writer = await started_writer(store_url)
    try:
        async with write_lock_held(store_url):
            for event in call_events("wal"):
                writer.emit(event)
            durable = writer.durable()
            await asyncio.sleep(0.3)  # the writer is blocked by the lock: nothing is committed
            assert not durable.done()
        async with asyncio.timeout(30):
            await durable
        stored = [s.event for s in await read_all(store_url)]
        assert [e.call_id for e in stored] == ["wal"] * len(LIFECYCLE)
        assert writer.durable().done()  # nothing new emitted: already durable
    finally:
        await writer.aclose()


async def test_a_payload_with_a_lone_surrogate_is_stored_with_a_replacement_character(
    store_url: str,
) -> None:
    (event,) = call_events("poison", types=(EventType.TRACE_CREATED,))
    poisoned = dataclasses.replace(event, payload={"operation_name": "op\ud83dx"})
    writer = await started_writer(store_url)
    writer.emit(poisoned)
    await writer.aclose()
    (stored,) = await read_all(store_url)
    assert stored.event.payload == {"operation_name": "op\ufffdx"}


async def test_quotes_and_sql_in_text_are_stored_verbatim(store_url: str) -> None:
    (event,) = call_events("quotes", types=(EventType.TRACE_CREATED,))
    text = "it's ''two'' \\' \"x\"; COMMIT; DROP TABLE events; --"
    quoted = dataclasses.replace(event, payload={"operation_name": text, "metadata": {text: text}})
    writer = await started_writer(store_url)
    writer.emit(quoted)
    await writer.aclose()
    (stored,) = await read_all(store_url)
    assert stored.event.payload == {"operation_name": text, "metadata": {text: text}}

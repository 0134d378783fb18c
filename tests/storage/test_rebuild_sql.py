"""The rebuild's SQL implementation (storage/_rebuild_sql.py) against the Python folds, on both
backends, for the cases where the two could disagree: float sums of many terms, per-event
cost rounding, minute and day boundaries, other time zones, unusual streams, small ranges."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta, timezone
from decimal import Decimal

import pytest

from llmtrail.pipeline import EventType, PriceTable
from llmtrail.pipeline._events import new_event_id
from llmtrail.pipeline._pricing import ModelPrice
from llmtrail.storage._projections import rebuild, run_projections
from tests.storage.projection_events import (
    T0,
    CallSpec,
    LogStore,
    call_events,
    interleave,
    sample_specs,
    snapshot,
)
from tests.storage.test_projections import expected_rows


@pytest.fixture
async def store(store_url):
    store = await LogStore.open(store_url)
    yield store
    await store.aclose()


async def assert_rebuild_equals_folds(store, log, prices=None):
    await store.append(log)
    await run_projections(store.engine, batch_size=2, prices=prices)
    want = await snapshot(store.engine)
    if prices is None:
        assert want == expected_rows(log)
    for size in (1, 3, 7, 100_000):
        await rebuild(store.engine, batch_size=size, prices=prices)
        assert await snapshot(store.engine) == want, f"batch_size={size}"
    return want


@pytest.mark.slow
async def test_rebuild_adds_many_float_terms_in_log_order(store):
    # Four rpm waits per call and many latencies per minute: sums whose last bit depends on
    # the order of the additions.
    specs = [
        CallSpec(
            f"f{i}",
            failures=("rate_limited", "server_error", "timeout"),
            rpm_wait_s=0.1 + i / 3,
            tpm_wait_s=1 / 7,
            semaphore_wait_s=0.3 / (i + 1),
            latency_s=0.7 + i / 11,
            step_s=0.01,
        )
        for i in range(12)
    ]
    log = interleave([call_events(s) for s in specs], random.Random(5))
    await assert_rebuild_equals_folds(store, log)


async def test_rebuild_rounds_the_cost_of_each_response_like_the_fold(store):
    # A price with 7 decimals makes each response's cost round at 1e-10; a call with two
    # `received` events must be priced per event in usage_daily.
    prices = PriceTable(
        {"odd": ModelPrice(Decimal("0.1234567"), Decimal("0.0000001"), Decimal("1.0000003"))}
    )
    events = call_events(CallSpec("two", model="odd", input_tokens=333, output_tokens=77))
    received = next(e for e in events if e.type == EventType.RECEIVED)
    second = replace(
        received,
        seq=len(events),
        occurred_at=received.occurred_at + timedelta(seconds=1),
        event_id=new_event_id(),
    )
    log = [*events, second, *call_events(CallSpec("one", model="odd", input_tokens=101))]
    incremental = await assert_rebuild_equals_folds(store, log, prices)
    # Each response rounded on its own: not the rounded cost of the call's summed tokens.
    two = next(r for r in incremental["calls"] if r["call_id"] == "two")
    assert two["input_tokens"] == 2 * 333
    assert sum((r["cost_usd"] for r in incremental["usage_daily"]), Decimal(0)) != sum(
        (r["cost_usd"] for r in incremental["calls"]), Decimal(0)
    )


async def test_rebuild_files_minutes_and_days_at_their_boundaries(store):
    # T0 is 23:58:30 UTC: these calls cross minutes, the day, and start at exact boundaries.
    specs = [
        CallSpec("edge-0", start=T0 + timedelta(seconds=29, microseconds=999_999), step_s=0.5),
        CallSpec("edge-1", start=T0 + timedelta(seconds=30), step_s=59.999999),
        CallSpec("edge-2", start=T0 + timedelta(seconds=89, microseconds=999_999), step_s=61),
        CallSpec("edge-3", start=T0 - timedelta(days=1), complete=False, cut=4),
    ]
    log = interleave([call_events(s) for s in specs], random.Random(2))
    await assert_rebuild_equals_folds(store, log)


async def test_rebuild_files_events_stamped_in_another_zone_under_utc(store):
    zone = timezone(timedelta(hours=-5, minutes=-30))
    log = [
        replace(e, occurred_at=e.occurred_at.astimezone(zone))
        for e in call_events(CallSpec("zoned", start=T0 + timedelta(seconds=20), step_s=45))
    ]
    rows = await assert_rebuild_equals_folds(store, log)
    assert rows["usage_daily"][0]["day"] == T0.date()


@pytest.mark.slow
async def test_rebuild_of_unusual_streams_equals_the_folds(store):
    base = call_events(CallSpec("odd-order", start=T0))
    # No trace_created; a completed that is not last; an event of a call after completed;
    # an interrupted call; a validation failure (no attempts).
    no_start = call_events(CallSpec("no-start", start=T0 + timedelta(seconds=3)))[1:]
    after_end = replace(
        base[2], seq=len(base), occurred_at=base[-1].occurred_at, event_id=new_event_id()
    )
    late = [*base, after_end]
    specs = [s for s in sample_specs() if s.call_id in {"c-died", "c-invalid", "c-unpriced"}]
    log = late + no_start + [e for s in specs for e in call_events(s)]
    await assert_rebuild_equals_folds(store, log)


async def test_rebuild_folds_streams_whose_key_events_repeat_or_come_out_of_place(store):
    # The SQL tells a simple call by the positions of its trace_created, received and
    # completed events: each of these streams breaks one of those conditions.
    def again(events, kind, *, at=None):
        first = next(e for e in events if e.type == kind)
        copy = replace(first, seq=len(events), event_id=new_event_id())
        out = [*events]
        out.insert(len(out) if at is None else at, copy)
        return out

    started_late = call_events(CallSpec("started-late", start=T0))
    started_late = [*started_late[1:3], started_late[0], *started_late[3:]]
    log = [
        *started_late,
        *again(call_events(CallSpec("two-starts", start=T0)), EventType.TRACE_CREATED),
        *again(call_events(CallSpec("two-ends", start=T0)), EventType.COMPLETED),
        *again(call_events(CallSpec("end-first", start=T0)), EventType.COMPLETED, at=1),
        *again(call_events(CallSpec("two-answers", start=T0)), EventType.RECEIVED, at=4),
    ]
    rows = await assert_rebuild_equals_folds(store, log)
    assert len(rows["calls"]) == 5

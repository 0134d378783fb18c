"""Projections: the pure folds, and the SQL runner on both backends (store_url)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

import llmtrail.storage._projections as projections_module
from llmtrail.pipeline import PriceTable
from llmtrail.storage import _schema as schema
from llmtrail.storage._engine import create_engine
from llmtrail.storage._folds import (
    CallRow,
    FoldEvent,
    MetricsRow,
    UsageKey,
    UsageRow,
    apply_calls,
    apply_metrics,
    apply_usage,
    metrics_minutes,
)
from llmtrail.storage._projections import (
    PROJECTIONS,
    ProjectionRunner,
    UnknownProjectionError,
    projection_status,
    rebuild,
    run_projections,
)
from tests.storage.projection_events import (
    T0,
    CallSpec,
    LogStore,
    call_events,
    sample_log,
    snapshot,
)

PRICES = PriceTable()


def stored(log):
    return [FoldEvent.from_event(i + 1, e) for i, e in enumerate(log)]


def fold_calls(batch, rows=None):
    rows = {} if rows is None else rows
    apply_calls(rows, batch, PRICES)
    return rows


def fold_usage(batch):
    deltas: dict[UsageKey, UsageRow] = {}
    apply_usage(deltas, {}, batch, PRICES)
    return deltas


def fold_metrics(batch):
    rows: dict[datetime, MetricsRow] = {}
    apply_metrics(rows, batch)
    return rows


# -- calls -------------------------------------------------------------------------------------


def test_succeeded_call_row_has_billed_tokens_exact_cost_and_gate_waits():
    rows = fold_calls(stored(call_events(CallSpec("a", metadata={"tenant": "acme"}))))
    row = rows["a"]
    assert row.outcome == "succeeded"
    assert row.error_type is None
    assert (row.attempts, row.input_tokens, row.cached_tokens) == (1, 120, 20)
    assert (row.output_tokens, row.reasoning_tokens) == (40, 8)
    # (100 * 0.15 + 20 * 0.075 + 40 * 0.60) / 1e6, exactly
    assert row.cost_usd == Decimal("0.0000405")
    assert row.priced is True
    assert (row.rpm_wait_s, row.tpm_wait_s, row.semaphore_wait_s) == (0.5, 0.25, 0.125)
    assert row.latency_s == 0.75
    assert row.total_s == 3.5
    assert row.metadata == {"tenant": "acme"}
    assert row.started_at == T0
    assert row.finished_at is not None and row.finished_at > row.started_at
    assert row.operation_name == "greet" and row.model == "gpt-4o-mini"
    assert row.instance == "host:1"


def test_retried_call_counts_every_attempt_and_its_429s():
    spec = CallSpec("r", failures=("rate_limited", "rate_limited", "server_error"))
    row = fold_calls(stored(call_events(spec)))["r"]
    assert row.outcome == "succeeded"
    assert row.attempts == 4
    assert row.rate_limited == 2
    assert row.rpm_wait_s == 0.5 * 4


def test_call_without_completed_is_interrupted_until_completed_arrives():
    log = stored(call_events(CallSpec("x")))
    rows = fold_calls(log[:-1])
    assert rows["x"].outcome == "interrupted"
    assert rows["x"].finished_at is None
    fold_calls(log[-1:], rows)
    assert rows["x"].outcome == "succeeded"
    assert rows["x"].last_position == log[-1].position


def test_unknown_model_is_unpriced_never_zero_dollars():
    row = fold_calls(stored(call_events(CallSpec("u", model="my-local-llama"))))["u"]
    assert row.cost_usd is None
    assert row.priced is False
    assert row.input_tokens == 120


def test_failed_and_cancelled_calls_keep_their_reason():
    log = stored(
        call_events(CallSpec("f", outcome="failed", final_error="auth"))
        + call_events(CallSpec("c", outcome="cancelled", failures=("timeout",)))
        + call_events(CallSpec("v", outcome="validation"))
    )
    rows = fold_calls(log)
    assert (rows["f"].outcome, rows["f"].error_type, rows["f"].attempts) == ("failed", "auth", 1)
    assert rows["f"].input_tokens == 0 and rows["f"].cost_usd == Decimal(0)
    assert (rows["c"].outcome, rows["c"].error_type) == ("cancelled", "cancelled")
    assert (rows["v"].outcome, rows["v"].error_type, rows["v"].attempts) == (
        "failed",
        "validation",
        0,
    )


def test_a_changed_price_table_reprices_on_replay():
    log = stored(call_events(CallSpec("p")))
    cheaper = PRICES.with_overrides(
        {"gpt-4o-mini": {"input": "1", "cached_input": "0.5", "output": "2"}}
    )
    rows: dict[str, CallRow] = {}
    apply_calls(rows, log, cheaper)
    assert rows["p"].cost_usd == Decimal("0.00019")  # (100 + 10 + 80) / 1e6


# -- usage_daily -------------------------------------------------------------------------------


def test_usage_files_a_call_under_its_start_day_model_and_operation():
    # T0 is two minutes before midnight: the call finishes on the next day.
    deltas = fold_usage(stored(call_events(CallSpec("a"))))
    assert list(deltas) == [UsageKey(date(2025, 3, 1), "gpt-4o-mini", "greet")]
    row = deltas[UsageKey(date(2025, 3, 1), "gpt-4o-mini", "greet")]
    assert (row.calls, row.succeeded, row.failed, row.cancelled) == (1, 1, 0, 0)
    assert row.cost_usd == Decimal("0.0000405")
    assert row.unpriced_calls == 0


def test_usage_counts_open_calls_and_unpriced_calls():
    log = stored(
        call_events(CallSpec("open", complete=False))
        + call_events(CallSpec("u", model="my-local-llama"))
    )
    deltas = fold_usage(log)
    opened = deltas[UsageKey(date(2025, 3, 1), "gpt-4o-mini", "greet")]
    assert (opened.calls, opened.succeeded + opened.failed + opened.cancelled) == (1, 0)
    unpriced = deltas[UsageKey(date(2025, 3, 1), "my-local-llama", "greet")]
    assert (unpriced.calls, unpriced.unpriced_calls, unpriced.cost_usd) == (1, 1, None)
    assert unpriced.input_tokens == 120


def test_usage_of_a_call_started_in_an_earlier_batch_uses_the_given_key():
    log = stored(call_events(CallSpec("a")))
    key = UsageKey(date(2025, 3, 1), "gpt-4o-mini", "greet")
    deltas: dict[UsageKey, UsageRow] = {}
    apply_usage(deltas, {"a": key}, log[1:], PRICES)
    assert deltas[key].calls == 0
    assert deltas[key].succeeded == 1
    assert deltas[key].cost_usd == Decimal("0.0000405")


# -- metrics_minute ----------------------------------------------------------------------------


def test_metrics_count_every_attempt_429_and_wait_by_minute():
    spec = CallSpec("m", failures=("rate_limited", "server_error"), step_s=1.0)
    log = stored(call_events(spec))
    rows = fold_metrics(log)
    assert set(rows) == metrics_minutes(log)
    assert all(m.second == 0 and m.microsecond == 0 and m.tzinfo is not None for m in rows)
    total = MetricsRow()
    for row in rows.values():
        for name in (
            "requests_sent",
            "responses_received",
            "tokens",
            "rate_limited",
            "errors",
            "latency_count",
        ):
            setattr(total, name, getattr(total, name) + getattr(row, name))
        total.rpm_wait_s += row.rpm_wait_s
    assert total.requests_sent == 3
    assert total.responses_received == 1
    assert total.tokens == 160
    assert total.rate_limited == 1
    assert total.errors == 2
    assert total.latency_count == 1
    assert total.rpm_wait_s == 1.5


def test_a_wait_is_filed_under_the_minute_it_ended():
    spec = CallSpec("w", start=datetime(2025, 1, 1, 12, 0, 59, 900000, tzinfo=UTC), tpm_wait_s=0.2)
    log = stored(call_events(spec))
    rows = fold_metrics(log[:2])
    assert list(rows) == [datetime(2025, 1, 1, 12, 1, tzinfo=UTC)]
    assert rows[datetime(2025, 1, 1, 12, 1, tzinfo=UTC)].tpm_wait_s == 0.2


def test_fold_over_batches_equals_fold_over_the_whole_log():
    log = stored(sample_log())
    whole = fold_calls(log)
    for size in (1, 2, 3, 7, len(log)):
        rows: dict[str, CallRow] = {}
        for start in range(0, len(log), size):
            apply_calls(rows, log[start : start + size], PRICES)
        assert rows == whole


# -- the SQL runner, on both backends ----------------------------------------------------------


@pytest.fixture
async def store(store_url):
    store = await LogStore.open(store_url)
    yield store
    await store.aclose()


def expected_rows(log):
    """The rows of a full fold in memory, shaped like :func:`snapshot`."""
    batch = stored(log)
    call_rows = fold_calls(batch)
    usage = fold_usage(batch)
    metrics = fold_metrics(batch)
    return {
        "calls": [call_rows[k].as_dict() for k in sorted(call_rows)],
        "usage_daily": [
            {
                "day": k.day,
                "model": k.model,
                "operation_name": k.operation_name,
                **usage[k].as_dict(),
            }
            for k in sorted(usage)
        ],
        "metrics_minute": [{"minute": m, **metrics[m].as_dict()} for m in sorted(metrics)],
    }


async def test_run_projections_stores_exactly_the_rows_of_the_fold(store):
    log = sample_log()
    await store.append(log)
    applied = await run_projections(store.engine, batch_size=5)
    assert applied == {name: len(log) for name in PROJECTIONS}
    got = await snapshot(store.engine)
    want = expected_rows(log)
    assert got == want
    assert {r["call_id"]: r["outcome"] for r in got["calls"]}["c-died"] == "interrupted"


async def test_money_survives_the_store_exactly(store):
    # 0.0000405 and 0.000675 would not survive a float sum exactly; Decimal columns must.
    specs = [CallSpec(f"m{i}", model=("gpt-4o-mini", "gpt-4o")[i % 2]) for i in range(30)]
    await store.append([e for s in specs for e in call_events(s)])
    await run_projections(store.engine, batch_size=7)
    got = await snapshot(store.engine)
    total = sum(r["cost_usd"] for r in got["calls"])
    assert total == Decimal("0.0000405") * 15 + Decimal("0.000675") * 15
    assert sum(r["cost_usd"] for r in got["usage_daily"]) == total
    assert all(isinstance(r["cost_usd"], Decimal) for r in got["calls"])


async def test_incremental_runs_over_a_growing_log_equal_a_rebuild(store):
    log = sample_log(seed=3)
    for start in range(0, len(log), 9):
        await store.append(log[start : start + 9])
        await run_projections(store.engine, batch_size=4)
    incremental = await snapshot(store.engine)
    assert incremental == expected_rows(log)
    await rebuild(store.engine)
    assert await snapshot(store.engine) == incremental
    assert await run_projections(store.engine) == dict.fromkeys(PROJECTIONS, 0)  # idempotent


async def test_interrupted_call_takes_its_outcome_when_completed_arrives_later(store):
    log = call_events(CallSpec("late"))
    await store.append(log[:-1])
    await run_projections(store.engine)
    assert (await snapshot(store.engine))["calls"][0]["outcome"] == "interrupted"
    await store.append(log[-1:])
    assert await run_projections(store.engine) == dict.fromkeys(PROJECTIONS, 1)
    row = (await snapshot(store.engine))["calls"][0]
    assert (row["outcome"], row["finished_at"]) == ("succeeded", log[-1].occurred_at)
    day = (await snapshot(store.engine))["usage_daily"][0]
    assert (day["calls"], day["succeeded"]) == (1, 1)


async def test_a_failed_batch_changes_neither_rows_nor_checkpoint(store, monkeypatch):
    log = sample_log()
    await store.append(log[:20])
    await run_projections(store.engine)
    before = await snapshot(store.engine)
    await store.append(log[20:])

    async def crash(conn, batch, prices):
        raise RuntimeError("power cut")

    # calls and usage_daily are written first in the same transaction, then this fails.
    monkeypatch.setitem(projections_module.APPLY, "metrics_minute", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        await run_projections(store.engine)
    assert await snapshot(store.engine) == before
    assert [s.position for s in await projection_status(store.engine)] == [20, 20, 20]
    monkeypatch.undo()
    await run_projections(store.engine)
    assert await snapshot(store.engine) == expected_rows(log)


async def test_rebuild_applies_a_changed_price_table_to_history(store):
    await store.append(call_events(CallSpec("p")))
    await run_projections(store.engine)
    pricier = PRICES.with_overrides(
        {"gpt-4o-mini": {"input": "1", "cached_input": "0.5", "output": "2"}}
    )
    await rebuild(store.engine, prices=pricier)
    got = await snapshot(store.engine)
    assert got["calls"][0]["cost_usd"] == Decimal("0.00019")
    assert got["usage_daily"][0]["cost_usd"] == Decimal("0.00019")


async def test_rebuild_of_one_projection_leaves_the_others_alone(store):
    log = sample_log()
    await store.append(log)
    await run_projections(store.engine)
    before = await snapshot(store.engine)
    assert await rebuild(store.engine, "usage_daily") == {"usage_daily": len(log)}
    assert await snapshot(store.engine) == before


async def test_status_reports_each_checkpoint_and_its_lag(store):
    log = sample_log()
    await store.append(log[:10])
    await run_projections(store.engine, "calls")
    await store.append(log[10:])
    status = {s.name: s for s in await projection_status(store.engine)}
    assert (status["calls"].position, status["calls"].lag) == (10, len(log) - 10)
    assert (status["usage_daily"].position, status["usage_daily"].lag) == (0, len(log))
    assert status["metrics_minute"].head_position == len(log)
    name, position, head, lag = status["calls"]
    assert (name, position, head, lag) == ("calls", 10, len(log), len(log) - 10)


async def test_two_runners_at_once_apply_each_event_exactly_once(store, store_url):
    other = create_engine(store_url)
    try:
        log = sample_log()
        await store.append(log)
        a, b = await asyncio.gather(
            run_projections(store.engine, batch_size=3), run_projections(other, batch_size=3)
        )
        for name in PROJECTIONS:
            assert a[name] + b[name] == len(log)
        assert await snapshot(store.engine) == expected_rows(log)
    finally:
        await other.dispose()


async def test_runner_run_once_applies_what_was_flushed_before_it(store):
    runner = ProjectionRunner(store.engine, batch_size=4)
    assert await runner.run_once() == dict.fromkeys(PROJECTIONS, 0)
    log = sample_log()
    await store.append(log[:30])
    assert await runner.run_once() == dict.fromkeys(PROJECTIONS, 30)
    await store.append(log[30:])
    assert await runner.run_once() == dict.fromkeys(PROJECTIONS, len(log) - 30)
    assert await snapshot(store.engine) == expected_rows(log)


async def test_runner_follow_stops_when_asked(store):
    runner = ProjectionRunner(store.engine)
    await store.append(sample_log())
    stop = asyncio.Event()
    seen = []

    def applied(counts):
        seen.append(counts)
        stop.set()

    await asyncio.wait_for(runner.follow(stop, interval_s=0.01, on_applied=applied), 30)
    assert seen == [dict.fromkeys(PROJECTIONS, len(sample_log()))]


async def test_unknown_projection_name_is_refused_with_the_valid_names(store):
    with pytest.raises(UnknownProjectionError, match="'cals'.*calls, usage_daily"):
        await run_projections(store.engine, "cals")


async def test_migrated_schema_matches_the_table_definitions(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def diff(sync_conn):
        context = MigrationContext.configure(sync_conn)
        return compare_metadata(context, schema.metadata)

    async with store.engine.connect() as conn:
        differences = await conn.run_sync(diff)
    mine = {"calls", "usage_daily", "metrics_minute", "projection_checkpoints"}
    relevant = [d for d in differences if _table_of(d) in mine]
    assert relevant == []


def _table_of(difference):
    item = difference[0] if isinstance(difference, list) else difference
    for part in item[1:]:
        name = getattr(part, "name", None)
        table = getattr(part, "table", None)
        if table is not None:
            return table.name
        if isinstance(part, str) and part in {
            "calls",
            "usage_daily",
            "metrics_minute",
            "projection_checkpoints",
        }:
            return part
        if name in {"calls", "usage_daily", "metrics_minute", "projection_checkpoints"}:
            return name
    return None

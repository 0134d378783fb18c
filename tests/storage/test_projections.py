"""Projections: the pure folds, and the SQL runner on both backends (store_url)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from projection_events import T0, CallSpec, call_events, sample_log

from pipeline import PriceTable
from storage._folds import (
    CallRow,
    MetricsRow,
    StoredEvent,
    UsageKey,
    UsageRow,
    apply_calls,
    apply_metrics,
    apply_usage,
    metrics_minutes,
)

PRICES = PriceTable()


def stored(log):
    return [StoredEvent.from_event(i + 1, e) for i, e in enumerate(log)]


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

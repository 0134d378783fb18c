"""Rebuilding projections with the database doing the per-call work: a second implementation
of the folds (storage/_folds.py) for a range of the log, checked against them by the tests.

A rebuild replays the log in ranges of positions ``(after, end]``; :func:`apply_range` applies
one range inside the caller's transaction (the one that also moves the checkpoints). It gives
exactly the rows the Python folds give for the same events, by splitting the work three ways:

- **Simple calls** (the usual case): every event of the call in the range, none before it,
  ``trace_created`` first and ``completed``, if any, last, at most one ``received``. One
  ``GROUP BY call_id`` query finds each call's first and last positions and those of these
  three events, and reads their fields by position (the payload with ``json_extract`` on
  SQLite, ``->>`` on PostgreSQL); Python prices them and inserts the rows.
- **Float sums** (gate waits, latencies) are never summed by SQL: SQLite's ``sum()`` does not
  promise an order, and from 3.43 on it compensates rounding errors, so its result can differ
  from the folds' left fold in the last bit. One narrow query returns the metric events in
  position order and Python adds them, in that order, onto the stored ``metrics_minute`` rows
  and onto each call, exactly as the folds do; it also counts each call's ``sent`` events and
  rate-limited failures (less the ``sent`` events an ``attempt_failed`` with ``not_sent``
  takes back: a request that never left).
- **Every other call** (it started before the range, or its stream is unusual) goes through
  the Python folds themselves, on its events in the range.

Both queries' rows come from the driver itself, not through SQLAlchemy's result objects (see
:func:`_fetch`). Money stays exact: costs are computed in Python from token sums (integers),
never in SQL. The payload fields read here have the types the pipeline emits
(pipeline/_events.py): integers for token counts and attempts, numbers for seconds, strings
for names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from llmtrail.pipeline import PriceTable

from ._folds import CallRow, MetricsRow, UsageKey, UsageRow, paused_gc, quantize_cost
from ._projection_tables import (
    APPLY,
    EVENT_COLUMNS,
    calls,
    decode_events,
    fold_usage,
    insert_rows,
    load_metrics,
    write_metrics,
    write_usage,
)
from ._schema import events

__all__ = ["RangeRead", "apply_range", "read_range"]

_FINAL_OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})
# The tag of an `attempt_failed` with `not_sent` (no error_type has a space).
_NOT_SENT = "not sent"
_IN_CHUNK = 2000


def _field(dialect: str, table: str, name: str, cast: str = "") -> str:
    """A top-level payload field of ``table``'s row as an SQL value (names here are fixed
    identifiers)."""
    payload = f"{table}.payload" if table else "payload"
    if dialect == "sqlite":
        return f"json_extract({payload}, '$.{name}')"
    value = f"({payload}->>'{name}')"
    return f"{value}::{cast}" if cast else value


def _calls_sql(dialect: str) -> str:
    t, r, c = (partial(_field, dialect, alias) for alias in "trc")
    metadata = (
        "json_extract(t.payload, '$.metadata')"
        if dialect == "sqlite"
        else "(t.payload->'metadata')::text"
    )

    def at(kind: str, pick: str) -> str:
        return f"{pick}(CASE WHEN type = '{kind}' THEN position END)"

    # The grouping reads only call_id, position and type (SQLite sorts exactly those), and
    # finds the positions of the events whose fields a simple call needs; the joins then read
    # those few rows by position. The positions also tell a simple call at no extra cost:
    # its latest trace_created is its first event (so it has exactly one), its earliest
    # completed, if any, is its last event (so it has exactly one), and its earliest and
    # latest received are the same event.
    # `spanning` tells a call with events before the range (its row must be folded onto).
    # It is read from the log, not from `calls`, so that the range can be read before the
    # previous one is committed.
    return f"""
SELECT a.call_id, a.first, a.last, a.tc, a.rc_first, a.rc, a.c,
    t.trace_id, t.instance, t.occurred_at,
    {t("operation_name")}, {t("model")}, {metadata},
    {r("input_tokens", "bigint")}, {r("cached_tokens", "bigint")},
    {r("output_tokens", "bigint")}, {r("reasoning_tokens", "bigint")},
    c.occurred_at, {c("outcome")}, {c("error_type")}, {c("total_s", "float8")},
    {c("attempts", "bigint")}, {c("model")},
    EXISTS (
        SELECT 1 FROM events p WHERE p.call_id = a.call_id AND p.position <= :after
    ) AS spanning
FROM (
    SELECT call_id, min(position) AS first, max(position) AS last,
        {at("trace_created", "max")} AS tc,
        {at("received", "min")} AS rc_first, {at("received", "max")} AS rc,
        {at("completed", "min")} AS c
    FROM events
    WHERE position > :after AND position <= :end
    GROUP BY call_id
) a
LEFT JOIN events t ON t.position = a.tc
LEFT JOIN events r ON r.position = a.rc
LEFT JOIN events c ON c.position = a.c
"""


def _metric_events_sql(dialect: str) -> str:
    f = partial(_field, dialect, "")
    minute = (
        "substr(occurred_at, 1, 16)"
        if dialect == "sqlite"
        else "date_trunc('minute', occurred_at AT TIME ZONE 'UTC')"
    )
    tokens = (
        f"coalesce({f('total_tokens', 'bigint')}, "
        f"coalesce({f('input_tokens', 'bigint')}, 0) + coalesce({f('output_tokens', 'bigint')}, 0))"
    )
    not_sent = f"{f('not_sent')} = " + ("1" if dialect == "sqlite" else "'true'")
    # `type || ''` keeps SQLite from choosing the index on type over the position range.
    return f"""
SELECT call_id, type, {minute},
    CASE WHEN type = 'gate_wait' THEN {f("gate")}
         WHEN type = 'attempt_failed' AND {not_sent} THEN '{_NOT_SENT}'
         WHEN type = 'attempt_failed' THEN {f("error_type")} END,
    CASE WHEN type IN ('gate_wait', 'semaphore_acquired') THEN {f("waited_s", "float8")}
         WHEN type IN ('received', 'attempt_failed') THEN {f("latency_s", "float8")} END,
    CASE WHEN type = 'received' THEN {tokens} END
FROM events
WHERE position > :after AND position <= :end
  AND type || '' IN ('gate_wait', 'semaphore_acquired', 'sent', 'received', 'attempt_failed')
ORDER BY position
"""


_SQL: dict[tuple[str, str], str] = {}


def _sql(kind: str, dialect: str) -> str:
    """The query in the driver's own parameter style: ``:after``/``:end`` for sqlite3,
    ``$1``/``$2`` for asyncpg."""
    key = (kind, dialect)
    if key not in _SQL:
        sql = (_calls_sql if kind == "calls" else _metric_events_sql)(dialect)
        if dialect != "sqlite":
            sql = sql.replace(":after", "$1").replace(":end", "$2")
        _SQL[key] = sql
    return _SQL[key]


async def _fetch(conn: AsyncConnection, kind: str, after: int, end: int) -> list[Any]:
    """The rows of one of the range's queries, taken from the driver as it gives them (tuples,
    asyncpg records), inside ``conn``'s transaction: SQLAlchemy's Row objects cost more than
    the query's own work, mostly in the collector's scans of them."""
    dialect = conn.dialect.name
    driver: Any = (await conn.get_raw_connection()).driver_connection
    if dialect == "sqlite":
        bounds = {"after": after, "end": end}
        return list(await driver.execute_fetchall(_sql(kind, dialect), bounds))
    return list(await driver.fetch(_sql(kind, dialect), after, end))


def _utc(value: Any) -> datetime:
    """SQLite gives the stored naive-UTC text, PostgreSQL an aware or naive datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# What the narrow pass gathers for a call: its rpm, tpm and semaphore waits (float sums in log
# order), its last latency, and how many times it was sent and rate limited.
_PerCall = list[Any]


def _fold_metric_events(
    rows: Sequence[Sequence[Any]],
    minutes: dict[Any, datetime],
    metrics: dict[datetime, MetricsRow] | None,
    per_call: dict[str, _PerCall] | None,
) -> set[datetime]:
    """The folds' float (and metrics) arithmetic, event by event in position order: the same
    additions onto the same starting values as apply_metrics and apply_calls."""
    touched: set[datetime] = set()
    current: Any = object()
    row = MetricsRow()
    call: _PerCall = [0.0, 0.0, 0.0, None, 0, 0]
    for call_id, kind, minute, tag, value, tokens in rows:
        if metrics is not None and minute != current:
            key = minutes[minute]
            found = metrics.get(key)
            if found is None:
                found = metrics[key] = MetricsRow()
            row, current = found, minute
            touched.add(key)
        if per_call is not None:
            got = per_call.get(call_id)
            if got is None:
                got = per_call[call_id] = [0.0, 0.0, 0.0, None, 0, 0]
            call = got
        if kind == "sent":
            row.requests_sent += 1
            call[4] += 1
        elif kind == "gate_wait":
            waited = float(value) if value is not None else 0.0
            if tag == "rpm":
                row.rpm_wait_s += waited
                call[0] += waited
            elif tag == "tpm":
                row.tpm_wait_s += waited
                call[1] += waited
        elif kind == "semaphore_acquired":
            waited = float(value) if value is not None else 0.0
            row.semaphore_wait_s += waited
            call[2] += waited
        elif kind == "received":
            row.responses_received += 1
            row.tokens += int(tokens)
            if value is not None:
                row.latency_sum_s += float(value)
                row.latency_count += 1
                call[3] = float(value)
        else:  # attempt_failed
            row.errors += 1
            if tag == "rate_limited":
                row.rate_limited += 1
                call[5] += 1
            elif tag == _NOT_SENT:  # its `sent` (same instant) never left
                row.requests_sent -= 1
                call[4] -= 1
            if value is not None:
                call[3] = float(value)
    return touched


def _usage_cost(prices: PriceTable, model: str, tokens: tuple[int, int, int]) -> Decimal | None:
    if not model:
        return None
    return quantize_cost(
        prices.cost(model, input_tokens=tokens[0], cached_tokens=tokens[1], output_tokens=tokens[2])
    )


@dataclass(frozen=True, slots=True)
class RangeRead:
    """What :func:`read_range` took from the log for one range: it reads events only, so any
    connection may run it, e.g. ahead of the transaction that applies the previous range."""

    after: int
    end: int
    metric_events: list[Any]
    grouped: list[Any]


async def read_range(
    conn: AsyncConnection, names: Sequence[str], after: int, end: int
) -> RangeRead:
    """Run the range's queries over the log (``after < position <= end``), in ``conn``'s
    transaction, which the caller has begun (a query through SQLAlchemy begins it)."""
    narrow: list[Any] = []
    grouped: list[Any] = []
    if "calls" in names or "metrics_minute" in names:
        narrow = await _fetch(conn, "metric_events", after, end)
    if "calls" in names or "usage_daily" in names:
        grouped = await _fetch(conn, "calls", after, end)
    return RangeRead(after, end, narrow, grouped)


async def apply_range(
    conn: AsyncConnection,
    names: Sequence[str],
    read: RangeRead,
    prices: PriceTable,
) -> None:
    """Apply the events of ``read``'s range to the projections ``names``, inside the caller's
    transaction: the rows :data:`APPLY` would write for the same events."""
    after, end = read.after, read.end
    want_calls, want_usage = "calls" in names, "usage_daily" in names
    want_metrics = "metrics_minute" in names

    per_call: dict[str, _PerCall] | None = {} if want_calls else None
    if want_calls or want_metrics:
        narrow = read.metric_events
        minutes = {m: _utc(m + ":00" if isinstance(m, str) else m) for m in {r[2] for r in narrow}}
        metrics: dict[datetime, MetricsRow] | None = None
        existing: set[datetime] = set()
        if want_metrics:
            metrics = await load_metrics(conn, sorted(set(minutes.values())))
            existing = set(metrics)
        with paused_gc():
            touched = _fold_metric_events(narrow, minutes, metrics, per_call)
        if metrics is not None:
            await write_metrics(conn, metrics, touched, existing)
    if not (want_calls or want_usage):
        return

    grouped = read.grouped
    new_rows: list[tuple[Any, ...]] = []
    deltas: dict[UsageKey, UsageRow] = {}
    other: list[str] = []
    with paused_gc():
        for found in grouped:
            (call_id, first, last, tc_pos, received_first, received, completed, trace_id, instance,
             started, operation, model, metadata, in_tokens, cached, out_tokens, reasoning,
             finished, outcome, error_type, total_s, attempts, completed_model,
             spanning) = found  # fmt: skip
            # Simple: one trace_created, first; at most one received; at most one completed,
            # last (see _calls_sql).
            if (
                spanning
                or tc_pos != first
                or received_first != received
                or (completed is not None and completed != last)
            ):
                other.append(call_id)
                continue
            tokens = (int(in_tokens or 0), int(cached or 0), int(out_tokens or 0))
            started_at = _utc(started)
            if want_calls:
                assert per_call is not None
                rpm, tpm, semaphore, latency, sent, rate_limited = per_call.get(call_id) or (
                    0.0,
                    0.0,
                    0.0,
                    None,
                    0,
                    0,
                )
                row = CallRow(
                    call_id,
                    trace_id=trace_id,
                    instance=instance or None,
                    operation_name=None if operation is None else str(operation),
                    model=(
                        str(model)
                        if model is not None
                        else None
                        if completed_model is None
                        else str(completed_model)
                    ),
                    started_at=started_at,
                    metadata=dict((orjson.loads(metadata) if metadata else None) or {}),
                    attempts=sent,
                    input_tokens=tokens[0],
                    cached_tokens=tokens[1],
                    output_tokens=tokens[2],
                    reasoning_tokens=int(reasoning or 0),
                    rpm_wait_s=rpm,
                    tpm_wait_s=tpm,
                    semaphore_wait_s=semaphore,
                    latency_s=latency,
                    rate_limited=rate_limited,
                    last_position=last,
                )
                if completed is not None:
                    row.outcome = outcome if outcome in _FINAL_OUTCOMES else "interrupted"
                    row.error_type = None if error_type is None else str(error_type)
                    row.finished_at = _utc(finished)
                    row.total_s = None if total_s is None else float(total_s)
                    row.attempts = max(sent, int(attempts or 0))
                row.reprice(prices)
                new_rows.append(row.as_tuple())
            if want_usage:
                key = UsageKey(started_at.date(), str(model or ""), str(operation or ""))
                usage = deltas.get(key)
                if usage is None:
                    usage = deltas[key] = UsageRow()
                usage.calls += 1
                if not key.model or prices.price(key.model) is None:
                    usage.unpriced_calls += 1
                if received is not None:
                    usage.input_tokens += tokens[0]
                    usage.cached_tokens += tokens[1]
                    usage.output_tokens += tokens[2]
                    usage.reasoning_tokens += int(reasoning or 0)
                    cost = _usage_cost(prices, key.model, tokens)
                    if cost is not None:
                        usage.cost_usd = cost + (usage.cost_usd or Decimal(0))
                if completed is not None:
                    if outcome == "succeeded":
                        usage.succeeded += 1
                    elif outcome == "failed":
                        usage.failed += 1
                    elif outcome == "cancelled":
                        usage.cancelled += 1
    if new_rows:
        await insert_rows(conn, calls, new_rows, bulk=True)
    if other:
        batch = await _events_of(conn, other, after, end)
        if want_calls:
            await APPLY["calls"](conn, batch, prices)
        if want_usage:
            await fold_usage(conn, deltas, batch, prices)
    if want_usage:
        await write_usage(conn, deltas)


async def _events_of(
    conn: AsyncConnection, call_ids: Sequence[str], after: int, end: int
) -> list[Any]:
    """The events of ``call_ids`` in the range, decoded for the folds, in position order."""
    rows: list[Any] = []
    for start in range(0, len(call_ids), _IN_CHUNK):
        result = await conn.execute(
            select(*EVENT_COLUMNS)
            .where(events.c.call_id.in_(call_ids[start : start + _IN_CHUNK]))
            .where(events.c.position > after)
            .where(events.c.position <= end)
        )
        rows.extend(result.all())
    rows.sort(key=lambda row: row[0])
    with paused_gc():
        return decode_events(rows)

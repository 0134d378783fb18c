"""The projection tables, and how one batch of events is applied to each of them.

Invariants:
- The tables are SQLAlchemy Core objects on storage's one ``MetaData``; the Alembic revision
  ``0002_projections`` creates them, never this module.
- Applying a batch to a projection happens inside the caller's transaction: the rows the batch
  touches are read, the batch is folded onto them (storage/_folds.py), and each touched row is
  written once, as an INSERT (new) or an UPDATE (existing). Nothing here commits.
- Money is exact: :class:`Money` reads and writes ``Decimal`` on both backends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    cast,
    insert,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine, UserDefinedType

from llmtrail.pipeline import PriceTable

from ._folds import (
    CALL_COLUMNS,
    COST_QUANTUM,
    METRICS_COLUMNS,
    USAGE_COLUMNS,
    CallRow,
    FoldEvent,
    MetricsRow,
    UsageKey,
    UsageRow,
    apply_calls,
    apply_metrics,
    apply_usage,
    call_usage_key,
    event_minutes,
    paused_gc,
)
from ._schema import UTCDateTime, events, metadata

__all__ = [
    "APPLY",
    "EVENT_COLUMNS",
    "TABLES",
    "Money",
    "calls",
    "decode_events",
    "fold_usage",
    "insert_rows",
    "load_metrics",
    "metrics_minute",
    "projection_checkpoints",
    "usage_daily",
    "write_metrics",
    "write_usage",
]

# Bound on the parameters of one `IN (...)` list: SQLite allows 32766, asyncpg 32767.
_IN_CHUNK = 2000


class _SQLiteNumeric(UserDefinedType[Any]):
    """``NUMERIC`` DDL on SQLite with no driver-side conversion (see :class:`Money`)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "NUMERIC(20, 10)"


class Money(TypeDecorator[Decimal]):
    """Exact USD amounts: ``NUMERIC(20, 10)`` on PostgreSQL.

    SQLite has no decimal type. The value is bound as its exact decimal string into a column
    of NUMERIC affinity: SQLite stores it as a REAL when the first 15 significant digits
    survive the conversion (so ad-hoc SQL can sort and compare it), and as the exact text
    otherwise. Either way it reads back as the same ``Decimal``.
    """

    impl = Numeric(20, 10)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_SQLiteNumeric())
        return dialect.type_descriptor(Numeric(20, 10, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = Decimal(value).quantize(COST_QUANTUM)
        if dialect.name == "sqlite":
            return format(exact.normalize(), "f")
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        # A REAL read back from SQLite is the nearest double; repr() gives its shortest decimal,
        # which is the stored value because it had at most 15 significant digits.
        return Decimal(repr(value) if isinstance(value, float) else str(value)).quantize(
            COST_QUANTUM
        )


_JSON = JSON().with_variant(JSONB(), "postgresql")

calls = Table(
    "calls",
    metadata,
    Column("call_id", Text, primary_key=True),
    Column("trace_id", Text),
    Column("operation_name", Text),
    Column("model", Text),
    Column("outcome", Text, nullable=False),
    Column("error_type", Text),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("attempts", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost_usd", Money),
    Column("priced", Boolean, nullable=False),
    Column("rpm_wait_s", Float, nullable=False),
    Column("tpm_wait_s", Float, nullable=False),
    Column("semaphore_wait_s", Float, nullable=False),
    Column("latency_s", Float),
    Column("total_s", Float),
    Column("metadata", _JSON),
    Column("instance", Text),
    Column("rate_limited", Integer, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Index("ix_calls_started_at", "started_at"),
    Index("ix_calls_trace_id", "trace_id"),
    Index("ix_calls_outcome", "outcome"),
)

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("day", Date, nullable=False),
    Column("model", Text, nullable=False),
    Column("operation_name", Text, nullable=False),
    Column("calls", BigInteger, nullable=False),
    Column("succeeded", BigInteger, nullable=False),
    Column("failed", BigInteger, nullable=False),
    Column("cancelled", BigInteger, nullable=False),
    Column("unpriced_calls", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost_usd", Money),
    PrimaryKeyConstraint("day", "model", "operation_name", name="pk_usage_daily"),
)

metrics_minute = Table(
    "metrics_minute",
    metadata,
    Column("minute", UTCDateTime, primary_key=True),
    Column("requests_sent", BigInteger, nullable=False),
    Column("responses_received", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("rate_limited", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("rpm_wait_s", Float, nullable=False),
    Column("tpm_wait_s", Float, nullable=False),
    Column("semaphore_wait_s", Float, nullable=False),
    Column("latency_sum_s", Float, nullable=False),
    Column("latency_count", BigInteger, nullable=False),
)

projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", Text, primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

TABLES: dict[str, Table] = {
    "calls": calls,
    "usage_daily": usage_daily,
    "metrics_minute": metrics_minute,
}


# The payload is read as its JSON text (jsonb::text on PostgreSQL) and decoded with orjson:
# on a rebuild, decoding is the largest cost per event and orjson is several times faster.
EVENT_COLUMNS = (
    events.c.position,
    events.c.call_id,
    events.c.type,
    # Plain DateTime skips UTCDateTime's conversion per row: SQLite gives naive UTC, which the
    # folds accept as UTC.
    type_coerce(events.c.occurred_at, DateTime(timezone=True)),
    events.c.trace_id,
    events.c.instance,
    cast(events.c.payload, Text),
)


def decode_events(rows: Iterable[Sequence[Any]]) -> list[FoldEvent]:
    loads = orjson.loads
    return [
        FoldEvent(
            position,
            call_id,
            kind,
            occurred_at,
            trace_id,
            instance,
            loads(payload) if payload is not None else {},
        )
        for position, call_id, kind, occurred_at, trace_id, instance, payload in rows
    ]


def _first(row: Sequence[Any]) -> Any:
    return row[0]


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# Applying one batch to one projection, inside the caller's transaction


async def _apply_calls(
    conn: AsyncConnection, batch: Sequence[FoldEvent], prices: PriceTable
) -> None:
    ids = sorted({e.call_id for e in batch})
    rows: dict[str, CallRow] = {}
    for chunk in _chunks(ids):
        result = await conn.execute(select(calls).where(calls.c.call_id.in_(chunk)))
        for found in result.mappings():
            rows[found["call_id"]] = CallRow(**{c: found[c] for c in CALL_COLUMNS})
    existing = set(rows)
    with paused_gc():
        touched = apply_calls(rows, batch, prices)
        new = [rows[i].as_tuple() for i in sorted(touched - existing)]
        old = [rows[i].as_dict() for i in sorted(touched & existing)]
    if new:
        await insert_rows(conn, calls, new)
    if old:
        await conn.execute(
            _update_by_key(calls, ("call_id",), CALL_COLUMNS), _keyed(old, ("call_id",))
        )


async def _apply_usage(
    conn: AsyncConnection, batch: Sequence[FoldEvent], prices: PriceTable
) -> None:
    deltas: dict[UsageKey, UsageRow] = {}
    await fold_usage(conn, deltas, batch, prices)
    await write_usage(conn, deltas)


async def fold_usage(
    conn: AsyncConnection,
    deltas: dict[UsageKey, UsageRow],
    batch: Sequence[FoldEvent],
    prices: PriceTable,
) -> None:
    """Fold ``batch`` into ``deltas``, looking up the key of each call started before it."""
    if not batch:
        return
    # The key of a call started in an earlier batch comes from its trace_created event. A call
    # whose received or completed comes before any trace_created of it in the batch needs that
    # key, even if the batch starts it again later.
    started_here: set[str] = set()
    needed: set[str] = set()
    for e in batch:
        if e.type == "trace_created":
            started_here.add(e.call_id)
        elif (e.type == "received" or e.type == "completed") and e.call_id not in started_here:
            needed.add(e.call_id)
    need = sorted(needed)
    first = batch[0].position
    call_keys: dict[str, UsageKey] = {}
    for chunk in _chunks(need):
        # No `type = 'trace_created'` in the WHERE clause: given one, SQLite picks the index on
        # type and scans every call ever started; by call_id it reads a few rows per call.
        result = await conn.execute(
            select(*EVENT_COLUMNS)
            .where(events.c.call_id.in_(chunk))
            .where(events.c.position < first)
        )
        # In log order: a call started more than once takes the key of its latest start.
        started = sorted((row for row in result.all() if row[2] == "trace_created"), key=_first)
        for event in decode_events(started):
            call_keys[event.call_id] = call_usage_key(event)
    with paused_gc():
        apply_usage(deltas, call_keys, batch, prices)


async def write_usage(conn: AsyncConnection, deltas: dict[UsageKey, UsageRow]) -> None:
    """Add ``deltas`` onto the stored ``usage_daily`` rows (exact: integers and Decimals)."""
    if not deltas:
        return
    keys = sorted(deltas)
    stored: dict[UsageKey, UsageRow] = {}
    key_cols = (usage_daily.c.day, usage_daily.c.model, usage_daily.c.operation_name)
    for chunk in _chunks(keys, 500):
        result = await conn.execute(
            select(usage_daily).where(tuple_(*key_cols).in_([tuple(k) for k in chunk]))
        )
        for found in result.mappings():
            key = UsageKey(found["day"], found["model"], found["operation_name"])
            stored[key] = UsageRow(**{c: found[c] for c in USAGE_COLUMNS})
    new: list[tuple[Any, ...]] = []
    old: list[dict[str, Any]] = []
    for key in keys:
        row = stored.get(key)
        if row is None:
            row = UsageRow()
            row.add(deltas[key])
            new.append((*key, *row.as_dict().values()))
        else:
            row.add(deltas[key])
            old.append(
                {
                    "day": key.day,
                    "model": key.model,
                    "operation_name": key.operation_name,
                    **row.as_dict(),
                }
            )
    key_names = ("day", "model", "operation_name")
    if new:
        await insert_rows(conn, usage_daily, new)
    if old:
        await conn.execute(
            _update_by_key(usage_daily, key_names, USAGE_COLUMNS), _keyed(old, key_names)
        )


async def _apply_metrics(
    conn: AsyncConnection, batch: Sequence[FoldEvent], prices: PriceTable
) -> None:
    per_event = event_minutes(batch)
    minutes = sorted({m for m in per_event if m is not None})
    if not minutes:
        return
    rows = await load_metrics(conn, minutes)
    existing = set(rows)
    with paused_gc():
        touched = apply_metrics(rows, batch, per_event)
    await write_metrics(conn, rows, touched, existing)


async def load_metrics(
    conn: AsyncConnection, minutes: Sequence[datetime]
) -> dict[datetime, MetricsRow]:
    """The stored ``metrics_minute`` rows of ``minutes`` (sorted), by minute."""
    rows: dict[datetime, MetricsRow] = {}
    for chunk in _chunks(minutes):
        result = await conn.execute(
            select(metrics_minute).where(metrics_minute.c.minute.in_(chunk))
        )
        for found in result.mappings():
            rows[found["minute"]] = MetricsRow(**{c: found[c] for c in METRICS_COLUMNS})
    return rows


async def write_metrics(
    conn: AsyncConnection,
    rows: dict[datetime, MetricsRow],
    touched: set[datetime],
    existing: set[datetime],
) -> None:
    """Write the ``touched`` minutes of ``rows``: INSERT the new, UPDATE the ``existing``."""
    new = [(m, *rows[m].as_dict().values()) for m in sorted(touched - existing)]
    old = [{"minute": m, **rows[m].as_dict()} for m in sorted(touched & existing)]
    if new:
        await insert_rows(conn, metrics_minute, new)
    if old:
        await conn.execute(
            _update_by_key(metrics_minute, ("minute",), METRICS_COLUMNS), _keyed(old, ("minute",))
        )


_Applier = Callable[[AsyncConnection, Sequence[FoldEvent], PriceTable], Awaitable[None]]
APPLY: dict[str, _Applier] = {
    "calls": _apply_calls,
    "usage_daily": _apply_usage,
    "metrics_minute": _apply_metrics,
}


@dataclass(frozen=True, slots=True)
class _InsertPlan:
    sql: str
    names: tuple[str, ...]  # the parameters' columns
    order: tuple[int, ...]  # for each parameter, the index of its column in the table
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]


_INSERT_PLANS: dict[tuple[str, str], _InsertPlan | None] = {}


def _insert_plan(table: Table, dialect: Dialect) -> _InsertPlan | None:
    """The compiled INSERT of every column and the dialect's bind processors, in parameter
    order; ``None`` for a paramstyle with named parameters."""
    key = (table.name, dialect.name)
    if key not in _INSERT_PLANS:
        stmt = insert(table).values({c.name: bindparam(c.name, type_=c.type) for c in table.c})
        compiled = stmt.compile(dialect=dialect)
        names = compiled.positiontup
        plan = None
        if names is not None:
            columns = list(table.c.keys())
            processors = []
            for index, name in enumerate(names):
                process = _bind_processor(table.c[name].type, dialect)
                if process is not None:
                    processors.append((index, process))
            order = tuple(columns.index(name) for name in names)
            plan = _InsertPlan(compiled.string, tuple(names), order, tuple(processors))
        _INSERT_PLANS[key] = plan
    return _INSERT_PLANS[key]


def _bind_processor(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor for the type, except for two that dominate a rebuild's
    inserts, replaced by C-speed equivalents that produce the same stored value: JSON (orjson)
    and, on SQLite, UTC datetimes (SQLite's naive ``YYYY-MM-DD HH:MM:SS.ffffff`` text, the
    layout SQLAlchemy and the event writer use)."""
    impl = type_.dialect_impl(dialect)
    if isinstance(impl, JSON):
        return _json_text
    if dialect.name == "sqlite" and isinstance(type_, UTCDateTime):
        return _sqlite_utc_text
    return impl.bind_processor(dialect)


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _sqlite_utc_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


async def insert_rows(
    conn: AsyncConnection, table: Table, rows: Sequence[Sequence[Any]], *, bulk: bool = False
) -> None:
    """``INSERT`` many rows, given as tuples in the table's column order.

    Each value goes through the bind processor SQLAlchemy would apply, but without building
    SQLAlchemy's per-row parameter dictionaries: on a rebuild, that bookkeeping cost more than
    SQLite's own work for the row. ``bulk`` (many rows) sends them with ``COPY`` on
    PostgreSQL, in the same transaction: the server parses and binds no statement per row."""
    plan = _insert_plan(table, conn.dialect)
    if plan is None:
        keys = list(table.c.keys())
        await conn.execute(insert(table), [dict(zip(keys, row, strict=True)) for row in rows])
        return
    order, processors = plan.order, plan.processors
    params: list[tuple[Any, ...]] = []
    with paused_gc():
        for row in rows:
            values = [row[i] for i in order]
            for index, process in processors:
                values[index] = process(values[index])
            params.append(tuple(values))
    if bulk and conn.dialect.name == "postgresql":
        driver: Any = (await conn.get_raw_connection()).driver_connection
        await driver.copy_records_to_table(table.name, records=params, columns=plan.names)
        return
    await conn.exec_driver_sql(plan.sql, params)


def _update_by_key(table: Table, key: Sequence[str], columns: Sequence[str]) -> Any:
    """``UPDATE table SET col = :col ... WHERE key = :k_key`` for an executemany."""
    stmt = update(table)
    for name in key:
        stmt = stmt.where(table.c[name] == bindparam(f"k_{name}"))
    return stmt.values({c: bindparam(c) for c in columns if c not in key})


def _keyed(rows: list[dict[str, Any]], key: Sequence[str]) -> list[dict[str, Any]]:
    # The key's bind parameters may not share a name with a SET column.
    for row in rows:
        for name in key:
            row[f"k_{name}"] = row.pop(name)
    return rows

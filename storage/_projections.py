"""Projections: the ``calls``, ``usage_daily`` and ``metrics_minute`` tables, kept up to date
by folding the event log, and rebuildable from it at any time.

Invariants:
- A projection's rows and its checkpoint (``projection_checkpoints``) change in one
  transaction, so every event is applied exactly once: a batch that fails leaves both as
  they were and is simply applied again.
- A batch first moves each checkpoint with a compare-and-set (``position = :seen``). That write
  comes before any other in the transaction, so it also takes the lock that serialises two
  runners on the same store; the loser finds the checkpoint moved, rolls back and re-reads.
- Rows are folded in Python (storage/_folds.py): the rows a batch touches are read inside the
  transaction, the batch is folded onto them event by event, and each touched row is written
  once. The result therefore does not depend on how the log is split into batches.
- Positions are monotonic but not contiguous; a checkpoint is the last position applied and
  readers page with ``position > checkpoint``.
- These tables are created by the Alembic revision ``0002_projections``, never here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
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
    delete,
    func,
    insert,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import TypeEngine, UserDefinedType

from pipeline import PriceTable

from ._engine import write_engine
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
)
from ._schema import UTCDateTime, events, metadata

__all__ = [
    "PROJECTIONS",
    "Money",
    "ProjectionConflictError",
    "ProjectionRunner",
    "ProjectionStatus",
    "UnknownProjectionError",
    "calls",
    "metrics_minute",
    "projection_checkpoints",
    "projection_status",
    "rebuild",
    "run_projections",
    "usage_daily",
]

DEFAULT_BATCH_SIZE = 5000
# Bound on the parameters of one `IN (...)` list: SQLite allows 32766, asyncpg 32767.
_IN_CHUNK = 2000


class UnknownProjectionError(ValueError):
    """A projection name that is not one of :data:`PROJECTIONS`."""


class ProjectionConflictError(RuntimeError):
    """Another runner kept moving the same checkpoint; raised after bounded retries."""


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

PROJECTIONS: tuple[str, ...] = ("calls", "usage_daily", "metrics_minute")
_TABLES: dict[str, Table] = {
    "calls": calls,
    "usage_daily": usage_daily,
    "metrics_minute": metrics_minute,
}


def _names(names: Iterable[str] | str | None) -> tuple[str, ...]:
    if names is None:
        return PROJECTIONS
    wanted = (names,) if isinstance(names, str) else tuple(names)
    for name in wanted:
        if name not in _TABLES:
            raise UnknownProjectionError(
                f"unknown projection {name!r}: use one of {', '.join(PROJECTIONS)}"
            )
    # Keep the canonical order and drop duplicates.
    return tuple(n for n in PROJECTIONS if n in wanted)


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
    touched = apply_calls(rows, batch, prices)
    new = [rows[i].as_tuple() for i in sorted(touched - existing)]
    old = [rows[i].as_dict() for i in sorted(touched & existing)]
    if new:
        await _insert_rows(conn, calls, new)
    if old:
        await conn.execute(
            _update_by_key(calls, ("call_id",), CALL_COLUMNS), _keyed(old, ("call_id",))
        )


async def _apply_usage(
    conn: AsyncConnection, batch: Sequence[FoldEvent], prices: PriceTable
) -> None:
    # The key of a call started in an earlier batch comes from its trace_created event.
    started_here = {e.call_id for e in batch if e.type == "trace_created"}
    need = sorted({e.call_id for e in batch if e.type in ("received", "completed")} - started_here)
    first = batch[0].position
    call_keys: dict[str, UsageKey] = {}
    for chunk in _chunks(need):
        result = await conn.execute(
            select(*_EVENT_COLUMNS)
            .where(events.c.call_id.in_(chunk))
            .where(events.c.type == "trace_created")
            .where(events.c.position < first)
        )
        for event in _decode(result.all()):
            call_keys[event.call_id] = call_usage_key(event)
    deltas: dict[UsageKey, UsageRow] = {}
    apply_usage(deltas, call_keys, batch, prices)
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
        await _insert_rows(conn, usage_daily, new)
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
    rows: dict[datetime, MetricsRow] = {}
    for chunk in _chunks(minutes):
        result = await conn.execute(
            select(metrics_minute).where(metrics_minute.c.minute.in_(chunk))
        )
        for found in result.mappings():
            rows[found["minute"]] = MetricsRow(**{c: found[c] for c in METRICS_COLUMNS})
    existing = set(rows)
    touched = apply_metrics(rows, batch, per_event)
    new = [(m, *rows[m].as_dict().values()) for m in sorted(touched - existing)]
    old = [{"minute": m, **rows[m].as_dict()} for m in sorted(touched & existing)]
    if new:
        await _insert_rows(conn, metrics_minute, new)
    if old:
        await conn.execute(
            _update_by_key(metrics_minute, ("minute",), METRICS_COLUMNS), _keyed(old, ("minute",))
        )


_Applier = Callable[[AsyncConnection, Sequence[FoldEvent], PriceTable], Awaitable[None]]
_APPLY: dict[str, _Applier] = {
    "calls": _apply_calls,
    "usage_daily": _apply_usage,
    "metrics_minute": _apply_metrics,
}


@dataclass(frozen=True, slots=True)
class _InsertPlan:
    sql: str
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
                process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors.append((index, process))
            order = tuple(columns.index(name) for name in names)
            plan = _InsertPlan(compiled.string, order, tuple(processors))
        _INSERT_PLANS[key] = plan
    return _INSERT_PLANS[key]


async def _insert_rows(conn: AsyncConnection, table: Table, rows: Sequence[Sequence[Any]]) -> None:
    """``INSERT`` many rows, given as tuples in the table's column order.

    Each value goes through the bind processor SQLAlchemy would apply, but without building
    SQLAlchemy's per-row parameter dictionaries: on a rebuild, that bookkeeping cost more than
    SQLite's own work for the row."""
    plan = _insert_plan(table, conn.dialect)
    if plan is None:
        keys = list(table.c.keys())
        await conn.execute(insert(table), [dict(zip(keys, row, strict=True)) for row in rows])
        return
    order, processors = plan.order, plan.processors
    params: list[tuple[Any, ...]] = []
    for row in rows:
        values = [row[i] for i in order]
        for index, process in processors:
            values[index] = process(values[index])
        params.append(tuple(values))
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


# --------------------------------------------------------------------------------------------
# Checkpoints and batches


async def _read_checkpoints(conn: AsyncConnection, names: Sequence[str]) -> dict[str, int]:
    result = await conn.execute(
        select(projection_checkpoints.c.name, projection_checkpoints.c.position).where(
            projection_checkpoints.c.name.in_(names)
        )
    )
    found = {name: int(position) for name, position in result}
    return {name: found.get(name, 0) for name in names}


async def _ensure_checkpoints(engine: AsyncEngine, names: Sequence[str]) -> None:
    """Create missing checkpoint rows at position 0. The migration creates them for the
    projections it knows; this covers a projection added later, and two runners racing to
    create one (ON CONFLICT DO NOTHING)."""
    async with engine.connect() as conn:
        result = await conn.execute(
            select(projection_checkpoints.c.name).where(projection_checkpoints.c.name.in_(names))
        )
        present = set(result.scalars())
    missing = [n for n in names if n not in present]
    if not missing:
        return
    rows = [{"name": n, "position": 0, "updated_at": _now()} for n in missing]
    async with write_engine(engine).begin() as conn:
        dialect_insert = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
        await conn.execute(
            dialect_insert(projection_checkpoints).on_conflict_do_nothing(index_elements=["name"]),
            rows,
        )


def _now() -> datetime:
    return datetime.now(UTC)


# The payload is read as its JSON text (jsonb::text on PostgreSQL) and decoded with orjson:
# on a rebuild, decoding is the largest cost per event and orjson is several times faster.
_EVENT_COLUMNS = (
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


def _decode(rows: Iterable[Sequence[Any]]) -> list[FoldEvent]:
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


async def _read_page(conn: AsyncConnection, after: int, limit: int) -> list[FoldEvent]:
    result = await conn.execute(
        select(*_EVENT_COLUMNS)
        .where(events.c.position > after)
        .order_by(events.c.position)
        .limit(limit)
    )
    return _decode(result.all())


class _Moved(Exception):
    """A checkpoint moved between our read and our compare-and-set."""


async def _apply_batch(
    engine: AsyncEngine,
    names: Sequence[str],
    seen: dict[str, int],
    batch: Sequence[FoldEvent],
    prices: PriceTable,
) -> dict[str, int]:
    """Apply ``batch`` to every projection in ``names`` whose checkpoint it passes, in one
    transaction. ``seen`` holds the checkpoints the batch was read against."""
    end = batch[-1].position
    applied: dict[str, int] = {}
    async with write_engine(engine).begin() as conn:
        now = _now()
        for name in names:
            if seen[name] >= end:
                continue
            moved = await conn.execute(
                update(projection_checkpoints)
                .where(projection_checkpoints.c.name == name)
                .where(projection_checkpoints.c.position == seen[name])
                .values(position=end, updated_at=now)
            )
            if moved.rowcount != 1:
                raise _Moved(name)
        for name in names:
            if seen[name] >= end:
                continue
            mine = (
                batch
                if seen[name] < batch[0].position
                else [e for e in batch if e.position > seen[name]]
            )
            await _APPLY[name](conn, mine, prices)
            applied[name] = len(mine)
    return applied


ProgressCallback = Callable[[int], None]


async def _run(
    engine: AsyncEngine,
    names: Sequence[str],
    batch_size: int,
    prices: PriceTable,
    *,
    until: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, int]:
    """Apply batches until every checkpoint has reached ``until`` (the head when we started,
    by default), so that a steady inflow of events cannot keep one run going for ever.

    The next page is read while the current batch is applied: on SQLite each connection does
    its I/O in its own thread, so reading and writing overlap."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: use an int >= 1")
    await _ensure_checkpoints(engine, names)
    totals = dict.fromkeys(names, 0)
    if until is None:
        until = await _head(engine)
    conflicts = 0
    while True:
        async with engine.connect() as conn:
            seen = await _read_checkpoints(conn, names)
        cursor = min(seen.values())
        if cursor >= until:
            return totals
        page: asyncio.Task[list[FoldEvent]] | None = asyncio.create_task(
            _fetch(engine, cursor, batch_size)
        )
        try:
            while page is not None:
                batch = await page
                page = None
                if not batch:
                    return totals
                end = batch[-1].position
                if end < until:
                    page = asyncio.create_task(_fetch(engine, end, batch_size))
                applied = await _apply_batch(engine, names, seen, batch, prices)
                for name, count in applied.items():
                    totals[name] += count
                seen = {name: max(position, end) for name, position in seen.items()}
                if progress is not None:
                    progress(end)
            return totals
        except _Moved as exc:
            # Another runner applied this batch first; re-read and continue from its result.
            conflicts += 1
            if conflicts > 100:
                raise ProjectionConflictError(
                    f"the checkpoint of projection {exc.args[0]!r} kept moving under this "
                    "runner; run one projection runner per store"
                ) from exc
        finally:
            if page is not None:
                page.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await page


async def _fetch(engine: AsyncEngine, after: int, limit: int) -> list[FoldEvent]:
    async with engine.connect() as conn:
        return await _read_page(conn, after, limit)


async def _head(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.scalar(select(func.max(events.c.position)))) or 0)


# --------------------------------------------------------------------------------------------
# Public API


async def run_projections(
    engine: AsyncEngine,
    names: Iterable[str] | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    prices: PriceTable | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, int]:
    """Apply every event after each projection's checkpoint; returns events applied per name.

    Cost uses ``prices`` (default: :meth:`PriceTable.default`) for the events applied now;
    use :func:`rebuild` to re-price history.
    """
    wanted = _names(names)
    return await _run(engine, wanted, batch_size, prices or PriceTable.default(), progress=progress)


async def rebuild(
    engine: AsyncEngine,
    names: Iterable[str] | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    prices: PriceTable | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, int]:
    """Wipe the projections and replay the whole log into them, in batches.

    The wipe and the reset of the checkpoints are one transaction; if the replay stops part
    way, :func:`run_projections` carries on from where it stopped.
    """
    wanted = _names(names)
    await _ensure_checkpoints(engine, wanted)
    async with write_engine(engine).begin() as conn:
        # Take the checkpoints first: a concurrent runner's compare-and-set then waits for us
        # and finds them reset.
        await conn.execute(
            update(projection_checkpoints)
            .where(projection_checkpoints.c.name.in_(wanted))
            .values(position=0, updated_at=_now())
        )
        for name in wanted:
            await conn.execute(delete(_TABLES[name]))
    return await _run(engine, wanted, batch_size, prices or PriceTable.default(), progress=progress)


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    name: str
    position: int
    head_position: int
    lag: int  # events after the checkpoint
    updated_at: datetime | None

    def __iter__(self) -> Any:
        return iter((self.name, self.position, self.head_position, self.lag))


async def projection_status(engine: AsyncEngine) -> list[ProjectionStatus]:
    """Each projection's checkpoint, the head of the log and how many events it lags."""
    async with engine.connect() as conn:
        head = int((await conn.scalar(select(func.max(events.c.position)))) or 0)
        result = await conn.execute(select(projection_checkpoints))
        stored = {row.name: (int(row.position), row.updated_at) for row in result}
        out: list[ProjectionStatus] = []
        for name in PROJECTIONS:
            position, updated = stored.get(name, (0, None))
            lag = int(
                await conn.scalar(
                    select(func.count()).select_from(events).where(events.c.position > position)
                )
                or 0
            )
            out.append(ProjectionStatus(name, position, head, lag, updated))
    return out


class ProjectionRunner:
    """Keeps projections current from inside a process, e.g. after each writer flush::

        runner = ProjectionRunner(engine)
        await writer.flush()
        await runner.run_once()

    Calls on one runner are serialised; runners in other processes are safe too (the
    checkpoints' compare-and-set), though they only make each other retry.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        names: Iterable[str] | str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prices: PriceTable | None = None,
    ) -> None:
        self.engine = engine
        self.names = _names(names)
        self.batch_size = batch_size
        self.prices = prices or PriceTable.default()
        self._lock = asyncio.Lock()

    async def run_once(self) -> dict[str, int]:
        """Apply everything committed before the call; returns events applied per name."""
        async with self._lock:
            return await _run(self.engine, self.names, self.batch_size, self.prices)

    async def follow(
        self,
        stop: asyncio.Event,
        *,
        interval_s: float = 1.0,
        on_applied: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        """Run until ``stop`` is set, polling the log every ``interval_s`` seconds."""
        while not stop.is_set():
            applied = await self.run_once()
            if on_applied is not None and any(applied.values()):
                on_applied(applied)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)


def _day(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value

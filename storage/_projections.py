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
- A rebuild replays ranges of the log with most of the per-call work done by the database
  (storage/_rebuild_sql.py), which gives the same rows as the Python folds; the tests hold the
  two implementations to each other.
- Positions are monotonic but not contiguous; a checkpoint is the last position applied and
  readers page with ``position > checkpoint``.
- The tables, and how a batch is applied to each, live in storage/_projection_tables.py; they
  are created by the Alembic revision ``0002_projections``, never here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmtrail.pipeline import ConfigurationError, PriceTable

from ._base import DEFAULT_BATCH_SIZE, PROJECTIONS, REBUILD_BATCH_SIZE, StoreError
from ._engine import write_engine
from ._folds import FoldEvent, paused_gc
from ._projection_tables import (
    APPLY,
    EVENT_COLUMNS,
    TABLES,
    Money,
    calls,
    decode_events,
    metrics_minute,
    projection_checkpoints,
    usage_daily,
)
from ._rebuild_sql import RangeRead, apply_range, read_range
from ._schema import events

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


class UnknownProjectionError(ConfigurationError):
    """A projection name that is not one of :data:`PROJECTIONS`."""


class ProjectionConflictError(StoreError):
    """Another runner kept moving the same checkpoint; raised after bounded retries."""


def _names(names: Iterable[str] | str | None) -> tuple[str, ...]:
    if names is None:
        return PROJECTIONS
    wanted = (names,) if isinstance(names, str) else tuple(names)
    for name in wanted:
        if name not in TABLES:
            raise UnknownProjectionError(
                f"unknown projection {name!r}: use one of {', '.join(PROJECTIONS)}"
            )
    # Keep the canonical order and drop duplicates.
    return tuple(n for n in PROJECTIONS if n in wanted)


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


async def _read_page(conn: AsyncConnection, after: int, limit: int) -> list[FoldEvent]:
    result = await conn.execute(
        select(*EVENT_COLUMNS)
        .where(events.c.position > after)
        .order_by(events.c.position)
        .limit(limit)
    )
    with paused_gc():
        return decode_events(result.all())


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
            await APPLY[name](conn, mine, prices)
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
        raise ConfigurationError(f"batch_size={batch_size!r} is invalid: use an int >= 1")
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
                # A prefetch still running when a batch failed: stop it, and let its own
                # outcome (even an error) give way to the batch's.
                page.cancel()
                await asyncio.gather(page, return_exceptions=True)


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
    batch_size: int = REBUILD_BATCH_SIZE,
    *,
    prices: PriceTable | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, int]:
    """Wipe the projections and replay the whole log into them, in batches.

    The wipe and the reset of the checkpoints are one transaction; if the replay stops part
    way, :func:`run_projections` carries on from where it stopped.
    """
    wanted = _names(names)
    if batch_size < 1:
        raise ConfigurationError(f"batch_size={batch_size!r} is invalid: use an int >= 1")
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
            await conn.execute(delete(TABLES[name]))
    return await _replay_ranges(
        engine, wanted, batch_size, prices or PriceTable.default(), progress=progress
    )


async def _replay_ranges(
    engine: AsyncEngine,
    names: Sequence[str],
    size: int,
    prices: PriceTable,
    *,
    progress: ProgressCallback | None = None,
) -> dict[str, int]:
    """Replay the log up to its current head in ranges of ``size`` events, each applied by
    storage/_rebuild_sql.py in one transaction with its checkpoints (compare-and-set, as in
    :func:`_apply_batch`). If another runner moves a checkpoint meanwhile, the batch runner
    takes over from wherever the checkpoints are."""
    totals = dict.fromkeys(names, 0)
    until = await _head(engine)
    async with engine.connect() as conn:
        seen = await _read_checkpoints(conn, names)
    cursor = min(seen.values())
    # The next range is read (on its own connection) while the current one is applied: on
    # SQLite each connection works in its own thread, on PostgreSQL in its own server process.
    ahead: asyncio.Task[tuple[int, RangeRead]] | None = None
    try:
        if any(position != cursor for position in seen.values()):
            raise _Moved(names[0])
        ahead = asyncio.create_task(_read_next_range(engine, names, cursor, size, until))
        while ahead is not None:
            count, read = await ahead
            ahead = None
            if not count:
                break
            if read.end < until:
                ahead = asyncio.create_task(_read_next_range(engine, names, read.end, size, until))
            async with write_engine(engine).begin() as conn:
                now = _now()
                for name in names:
                    moved = await conn.execute(
                        update(projection_checkpoints)
                        .where(projection_checkpoints.c.name == name)
                        .where(projection_checkpoints.c.position == read.after)
                        .values(position=read.end, updated_at=now)
                    )
                    if moved.rowcount != 1:
                        raise _Moved(name)
                await apply_range(conn, names, read, prices)
            for name in names:
                totals[name] += count
            if progress is not None:
                progress(read.end)
    except _Moved:
        rest = await _run(engine, names, size, prices, until=until, progress=progress)
        for name, count in rest.items():
            totals[name] += count
    finally:
        if ahead is not None:
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)
    return totals


async def _read_next_range(
    engine: AsyncEngine, names: Sequence[str], after: int, size: int, until: int
) -> tuple[int, RangeRead]:
    async with engine.connect() as conn:
        count, end = await _next_range(conn, after, size, until)
        return count, await read_range(conn, names, after, end)


async def _next_range(conn: AsyncConnection, after: int, size: int, until: int) -> tuple[int, int]:
    """How many events the next range holds, and its last position (at most ``until``)."""
    page = (
        select(events.c.position)
        .where(events.c.position > after)
        .where(events.c.position <= until)
        .order_by(events.c.position)
        .limit(size)
        .subquery()
    )
    found = (await conn.execute(select(func.count(), func.max(page.c.position)))).one()
    return int(found[0]), int(found[1] or after)


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    name: str
    position: int
    head_position: int
    lag: int  # events after the checkpoint
    updated_at: datetime | None

    def __iter__(self) -> Iterator[str | int]:
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

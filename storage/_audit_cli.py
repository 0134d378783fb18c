"""The audit commands: ``llmtrail projections run|rebuild|status``, ``usage`` and ``sql``.

Invariants:
- :func:`register` only adds parsers; nothing is opened until a command runs.
- Exit codes: 0 ok, 1 failure (store unreachable, SQL error), 2 bad usage (bad option, bad
  URL, missing store, a statement ``sql`` refuses). Errors are one line on stderr, never a
  traceback.
- ``usage`` brings the projections up to date first, then reads them; money is summed as
  ``Decimal`` in Python, never as a float in SQL, and printed exactly.
- ``sql`` runs through :mod:`._readonly` (its invariants: read-only in effect, bounded in time,
  cancelled on the server by Ctrl-C); a refused statement exits 2, a timeout 1, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ._cli import UsageError, add_store_argument, parse_time, run_command
from ._engine import (
    StoreConfigError,
    StoreUnavailableError,
    create_engine,
    mask_url,
)
from ._folds import USAGE_COLUMNS, UsageRow
from ._migrate import check_schema, ensure_schema, head_revision
from ._projections import (
    DEFAULT_BATCH_SIZE,
    PROJECTIONS,
    REBUILD_BATCH_SIZE,
    ProjectionRunner,
    calls,
    projection_status,
    rebuild,
    run_projections,
    usage_daily,
)
from ._readonly import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    ReadOnlyLimits,
    run_readonly_sql,
    stop_on_signal,
)

__all__ = ["UsageLine", "register", "usage_report"]

_FORMATS = ("table", "csv", "json")
_BY_FIXED = ("day", "model", "operation")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``projections``, ``usage`` and ``sql`` to the ``llmtrail`` command line."""
    projections = subparsers.add_parser(
        "projections",
        help="apply, rebuild or inspect the projections (calls, usage_daily, metrics_minute)",
        description="Projections are tables derived from the event log; they can always be "
        "rebuilt by replaying it.",
    )
    actions = projections.add_subparsers(dest="action", metavar="ACTION", required=True)
    names = f"one of {', '.join(PROJECTIONS)} (default: all)"

    run = actions.add_parser(
        "run",
        help="apply new events",
        description="Apply the events stored since each projection's checkpoint, exactly once.",
    )
    add_store_argument(run)
    run.add_argument("name", nargs="?", metavar="NAME", help=names)
    run.add_argument("--follow", action="store_true", help="keep applying new events until ^C")
    run.add_argument(
        "--interval", metavar="S", type=float, default=1.0, help="--follow poll interval (1.0)"
    )
    run.add_argument(
        "--batch-size", metavar="N", type=int, default=DEFAULT_BATCH_SIZE, help="events per batch"
    )
    run.set_defaults(func=_run_command)

    rebuild_parser = actions.add_parser(
        "rebuild",
        help="wipe and replay from position 0",
        description="Wipe projections and replay the whole log into them, re-pricing every "
        "call with the current price table.",
    )
    add_store_argument(rebuild_parser)
    rebuild_parser.add_argument("name", nargs="?", metavar="NAME", help=names)
    rebuild_parser.add_argument(
        "--batch-size", metavar="N", type=int, default=REBUILD_BATCH_SIZE, help="events per batch"
    )
    rebuild_parser.set_defaults(func=_rebuild_command)

    status = actions.add_parser(
        "status",
        help="checkpoints and lag",
        description="Each projection's checkpoint, the "
        "head of the log and how many events the projection lags behind.",
    )
    add_store_argument(status)
    status.add_argument("--format", choices=_FORMATS, default="table", help="output format")
    status.set_defaults(func=_status_command)

    usage = subparsers.add_parser(
        "usage",
        help="calls, tokens and spend, grouped",
        description="Calls, outcomes, tokens and exact spend from the projections (brought up "
        "to date first). Unpriced calls are counted, never priced at $0.",
    )
    add_store_argument(usage)
    usage.add_argument(
        "--by",
        default="day",
        metavar="KEY",
        help="group by day, model, operation or metadata.KEY (e.g. metadata.tenant); default day",
    )
    usage.add_argument("--since", metavar="TIME", help="calls started at or after TIME")
    usage.add_argument("--until", metavar="TIME", help="calls started before TIME")
    usage.add_argument("--format", choices=_FORMATS, default="table", help="output format")
    usage.set_defaults(func=_usage_command)

    sql = subparsers.add_parser(
        "sql",
        help="run one read-only SQL statement",
        description="Run one SQL statement against the store, read-only (see docs/sql.md for "
        "the schema and ready queries). Statements that would write are refused.",
    )
    add_store_argument(sql)
    sql.add_argument("statement", metavar="SQL", help='e.g. "SELECT * FROM usage_daily"')
    sql.add_argument("--format", choices=_FORMATS, default="table", help="output format")
    sql.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"cancel the statement on the server after S seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    sql.add_argument(
        "--max-rows",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help=f"fail rather than hold more than N rows in memory (default {DEFAULT_MAX_ROWS:,})",
    )
    sql.add_argument(
        "--allow-privileged-role",
        action="store_true",
        help="PostgreSQL: run even as a superuser or a role that reaches server files, "
        "programs or other sessions (default: refuse; see docs/sql.md for a reader role)",
    )
    sql.set_defaults(func=_sql_command)


# -- shared ------------------------------------------------------------------------------------


def _guarded(name: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """:func:`run_command`, with SQLAlchemy's errors turned into one line too."""

    async def wrapped() -> int:
        try:
            return await main()
        except DBAPIError as exc:
            raise StoreUnavailableError(_db_message(exc)) from None
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(str(exc).splitlines()[0]) from None

    return run_command(name, wrapped)


def _db_message(exc: DBAPIError) -> str:
    """The database's own message, first line, without SQLAlchemy's decoration."""
    orig = exc.orig if exc.orig is not None else exc
    text = str(orig).strip() or type(orig).__name__
    # asyncpg errors arrive wrapped as "<class '...'>: message".
    if text.startswith("<class"):
        text = text.split(">: ", 1)[-1]
    return text.splitlines()[0]


async def _open_for_writing(url: str) -> AsyncEngine:
    engine = create_engine(url, must_exist=True)
    try:
        await ensure_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine


def _projection_name(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if value not in PROJECTIONS:
        raise UsageError(f"unknown projection {value!r}: use one of {', '.join(PROJECTIONS)}")
    return [value]


def _batch_size(value: int) -> int:
    if value < 1:
        raise UsageError(f"--batch-size {value} is invalid: use an integer >= 1")
    return value


# -- projections ---------------------------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        names = _projection_name(args.name)
        batch_size = _batch_size(args.batch_size)
        if args.interval <= 0:
            raise UsageError(f"--interval {args.interval:g} is invalid: use seconds > 0")
        engine = await _open_for_writing(args.store)
        try:
            if not args.follow:
                applied = await run_projections(engine, names, batch_size)
                _print_applied(applied)
                return 0
            runner = ProjectionRunner(engine, names, batch_size=batch_size)
            print(
                f"applying new events to {', '.join(runner.names)} every {args.interval:g}s; "
                "^C to stop",
                file=sys.stderr,
            )
            await runner.follow(
                asyncio.Event(), interval_s=args.interval, on_applied=_print_applied
            )
            return 0
        finally:
            await engine.dispose()

    return _guarded("projections run", main)


def _print_applied(applied: Mapping[str, int]) -> None:
    print(", ".join(f"{name}: {count} events applied" for name, count in applied.items()))
    sys.stdout.flush()


def _rebuild_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        names = _projection_name(args.name)
        batch_size = _batch_size(args.batch_size)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        engine = await _open_for_writing(args.store)
        try:
            head = (await projection_status(engine))[0].head_position
            console = Console(stderr=True)
            started = time.perf_counter()
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("replaying positions", total=max(head, 1))
                applied = await rebuild(
                    engine,
                    names,
                    batch_size,
                    progress=lambda position: progress.update(task, completed=position),
                )
            elapsed = time.perf_counter() - started
            count = max(applied.values(), default=0)
            rate = count / elapsed if elapsed > 0 else 0.0
            print(
                f"rebuilt {', '.join(applied)} from {count} events in {elapsed:.1f}s "
                f"({rate:,.0f} events/s)"
            )
            return 0
        finally:
            await engine.dispose()

    return _guarded("projections rebuild", main)


def _status_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        engine = create_engine(args.store, must_exist=True)
        try:
            revision = await check_schema(engine)
            if revision != head_revision():
                raise StoreConfigError(
                    f"the store {mask_url(engine.url)!r} is at schema revision {revision!r}, "
                    f"older than this llmtrail's {head_revision()!r}: run "
                    "`llmtrail migrate --store URL`"
                )
            rows = [
                {
                    "name": s.name,
                    "position": s.position,
                    "head_position": s.head_position,
                    "lag": s.lag,
                    "updated_at": s.updated_at,
                }
                for s in await projection_status(engine)
            ]
        finally:
            await engine.dispose()
        _emit(list(rows[0]), [list(r.values()) for r in rows], args.format, title="projections")
        return 0

    return _guarded("projections status", main)


# -- usage ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class UsageLine(UsageRow):
    """One group of ``llmtrail usage``: a :class:`UsageRow` with its key. ``cost_usd`` is the
    exact sum over the priced calls (``None`` when every call in the group is unpriced)."""

    key: str = ""

    @property
    def interrupted(self) -> int:
        """Calls started but not completed: still running, or their process died."""
        return self.calls - self.succeeded - self.failed - self.cancelled

    def as_dict(self) -> dict[str, Any]:
        return {**UsageRow.as_dict(self), "interrupted": self.interrupted}


_COUNTERS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def _check_by(by: str) -> None:
    if by not in _BY_FIXED and not (by.startswith("metadata.") and len(by) > len("metadata.")):
        raise UsageError(
            f"--by {by!r} is invalid: use day, model, operation or metadata.KEY "
            "(e.g. metadata.tenant)"
        )


def _midnight(value: datetime | None) -> bool:
    return value is None or value.timetz().replace(tzinfo=None) == dtime(0)


async def usage_report(
    engine: AsyncEngine,
    by: str = "day",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[UsageLine]:
    """Usage grouped by ``day``, ``model``, ``operation`` or ``metadata.KEY``, over calls that
    started in ``[since, until)``. Reads the projections as they are: run them first.

    Whole-day bounds (or none) are answered from ``usage_daily``; other bounds and metadata
    keys from ``calls``. Both give the same figures for the same calls.
    """
    _check_by(by)
    lines: dict[str, UsageLine] = {}

    def line(key: str) -> UsageLine:
        found = lines.get(key)
        if found is None:
            found = lines[key] = UsageLine(key=key)
        return found

    async with engine.connect() as conn:
        if by in _BY_FIXED and _midnight(since) and _midnight(until):
            query = select(usage_daily)
            if since is not None:
                query = query.where(usage_daily.c.day >= since.date())
            if until is not None:
                query = query.where(usage_daily.c.day < until.date())
            column = {"day": "day", "model": "model", "operation": "operation_name"}[by]
            for row in (await conn.execute(query)).mappings():
                line(str(row[column])).add(UsageRow(**{c: row[c] for c in USAGE_COLUMNS}))
        else:
            key_name = by.removeprefix("metadata.") if by.startswith("metadata.") else None
            columns = [
                calls.c.started_at,
                calls.c.model,
                calls.c.operation_name,
                calls.c.outcome,
                calls.c.priced,
                calls.c.cost_usd,
                *(calls.c[name] for name in _COUNTERS),
            ]
            if key_name is not None:
                columns.append(calls.c.metadata)
            query = select(*columns)
            if since is not None:
                query = query.where(calls.c.started_at >= since)
            if until is not None:
                query = query.where(calls.c.started_at < until)
            result = await conn.stream(query)
            async for row in result.mappings():
                if key_name is not None:
                    value = (row["metadata"] or {}).get(key_name)
                    key = "(none)" if value is None else str(value)
                elif by == "day":
                    started = row["started_at"]
                    key = started.astimezone(UTC).date().isoformat() if started else "(none)"
                elif by == "model":
                    key = row["model"] or ""
                else:
                    key = row["operation_name"] or ""
                outcome = row["outcome"]
                line(key).add(
                    UsageRow(
                        calls=1,
                        succeeded=int(outcome == "succeeded"),
                        failed=int(outcome == "failed"),
                        cancelled=int(outcome == "cancelled"),
                        unpriced_calls=int(not row["priced"]),
                        cost_usd=row["cost_usd"],
                        **{name: row[name] for name in _COUNTERS},
                    )
                )
    return [lines[key] for key in sorted(lines)]


def _usage_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        since = parse_time(args.since, option="--since") if args.since else None
        until = parse_time(args.until, option="--until") if args.until else None
        if since is not None and until is not None and since >= until:
            raise UsageError(f"--since {args.since!r} is not before --until {args.until!r}")
        _check_by(args.by)
        engine = await _open_for_writing(args.store)
        try:
            await run_projections(engine)
            report = await usage_report(engine, args.by, since, until)
        finally:
            await engine.dispose()
        header = [
            args.by,
            "calls",
            "succeeded",
            "failed",
            "cancelled",
            "interrupted",
            "unpriced_calls",
            *_COUNTERS,
            "cost_usd",
        ]
        rows = [
            [line.as_dict()[h] if h != args.by else line.key for h in header] for line in report
        ]
        footer = None
        if args.format == "table" and len(report) > 1:
            total = UsageLine(key="total")
            for item in report:
                total.add(item)
            footer = [total.as_dict()[h] if h != args.by else "total" for h in header]
        _emit(header, rows, args.format, title="usage", footer=footer)
        return 0

    return _guarded("usage", main)


# -- sql -----------------------------------------------------------------------------------------


def _sql_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        limits = ReadOnlyLimits(args.timeout, args.max_rows, args.allow_privileged_role)
        header, rows = await run_readonly_sql(args.store, args.statement, limits)
        if header:
            _emit(header, rows, args.format, title=None)
        return 0

    return _guarded("sql", lambda: stop_on_signal("sql", main()))


# -- output --------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready value; Decimal becomes an exact string."""
    if isinstance(value, Decimal):
        return _money(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _money(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return _money(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float):
        # The shortest exact decimal, without an exponent: 4.05e-05 reads as 0.0000405.
        return format(Decimal(repr(value)), "f") if math.isfinite(value) else repr(value)
    return str(value)


def _emit(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    fmt: str,
    *,
    title: str | None,
    footer: Sequence[Any] | None = None,
) -> None:
    if fmt == "json":
        print(
            json.dumps([dict(zip(header, map(_plain, row), strict=True)) for row in rows], indent=2)
        )
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else _plain(v) for v in row])
        sys.stdout.write(buffer.getvalue())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_footer=footer is not None)
    for index, name in enumerate(header):
        table.add_column(name, footer=_cell(footer[index]) if footer is not None else "")
    cells = [[_cell(v) for v in row] for row in rows]
    for row_cells in cells:
        table.add_row(*row_cells)
    # Wide enough that no value is cut, even when stdout is a pipe (rich assumes 80 there).
    widths = [len(h) for h in header]
    for row_cells in [*cells, [_cell(v) for v in footer or []]]:
        for index, text in enumerate(row_cells):
            widths[index] = max(widths[index], len(text))
    console = Console()
    console.width = max(console.width, sum(widths) + 3 * len(widths) + 1)
    console.print(table)

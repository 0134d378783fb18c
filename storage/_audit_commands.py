"""The audit commands' bodies: ``projections run|rebuild|status``, ``usage`` and ``sql``.

Their options are declared in :mod:`._audit_cli` (which the parser imports); this module is
imported only when one of them runs. The invariants of the commands are stated there.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail.pipeline._output import Column, chosen_format, emit_rows

from ._base import PROJECTIONS, StoreConfigError, StoreUnavailableError, mask_url
from ._cli import UsageError, parse_time, run_command
from ._engine import create_engine
from ._projections import (
    ProjectionRunner,
    projection_status,
    rebuild,
    run_projections,
)
from ._readonly import (
    ReadOnlyLimits,
    run_readonly_sql,
    stop_on_signal,
)
from ._usage import COUNTERS, UsageLine, check_by, usage_report

__all__: list[str] = []


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
    # Alembic (behind _migrate) loads when a command runs, not when the parser is built.
    from ._migrate import ensure_schema

    engine = create_engine(url, must_exist=True)
    try:
        await ensure_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine


async def catch_up(url: str, command: str, *, apply: bool, required: bool = True) -> AsyncEngine:
    """An engine on the store, its projections brought up to date first.

    Without ``apply``, nothing is written: a note on stderr says how many events each
    projection lags. When catching up fails and it is not ``required`` (``sql`` as a
    read-only role), a warning says the tables may be stale and the command goes on.
    """
    from ._migrate import check_schema

    if not apply:
        engine = create_engine(url, must_exist=True)
        try:
            await check_schema(engine)
            statuses = await projection_status(engine)
        except BaseException:
            await engine.dispose()
            raise
        behind = [s for s in statuses if s.lag]
        text = (
            "projections lag the event log: "
            + ", ".join(f"{s.name} by {s.lag} events" for s in behind)
            + " (leave out --no-catch-up, or run `llmtrail projections run`)"
            if behind
            else "projections are up to date with the event log"
        )
        print(f"llmtrail {command}: note: {text}", file=sys.stderr)
        return engine
    if required:
        engine = await _open_for_writing(url)
    else:
        engine = create_engine(url, must_exist=True)
    try:
        await run_projections(engine)
    except (SQLAlchemyError, StoreUnavailableError) as exc:
        if required:
            await engine.dispose()
            raise
        reason = _db_message(exc) if isinstance(exc, DBAPIError) else str(exc).splitlines()[0]
        print(
            f"llmtrail {command}: warning: could not bring the projections up to date, so "
            f"calls, usage_daily and metrics_minute may lag the event log: {reason}",
            file=sys.stderr,
        )
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
            report = functools.partial(_print_applied, as_json=args.format == "json")
            if not args.follow:
                report(await run_projections(engine, names, batch_size))
                return 0
            runner = ProjectionRunner(engine, names, batch_size=batch_size)
            print(
                f"applying new events to {', '.join(runner.names)} every {args.interval:g}s; "
                "^C to stop",
                file=sys.stderr,
            )
            await runner.follow(asyncio.Event(), interval_s=args.interval, on_applied=report)
            return 0
        finally:
            await engine.dispose()

    return _guarded("projections run", main)


def _print_applied(applied: Mapping[str, int], *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"applied": dict(applied)}))
    else:
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
            if args.format == "json":
                print(json.dumps({"rebuilt": list(applied), "events": count, "elapsed_s": elapsed}))
            else:
                print(
                    f"rebuilt {', '.join(applied)} from {count} events in {elapsed:.1f}s "
                    f"({rate:,.0f} events/s)"
                )
            return 0
        finally:
            await engine.dispose()

    return _guarded("projections rebuild", main)


def _status_command(args: argparse.Namespace) -> int:
    from ._migrate import check_schema, head_revision

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
        columns = [
            Column("name"),
            Column("position", numeric=True, priority=2),
            Column("head_position", numeric=True, priority=2),
            Column("lag", numeric=True),
            Column("updated_at", priority=1),
        ]
        emit_rows(
            columns,
            [list(r.values()) for r in rows],
            chosen_format(args.format),
            title="projections",
        )
        return 0

    return _guarded("projections status", main)


# -- usage ---------------------------------------------------------------------------------------


_USAGE_PRIORITY = {
    "calls": 0,
    "failed": 1,
    "unpriced_calls": 1,
    "cost_usd": 0,
    "succeeded": 2,
    "input_tokens": 2,
    "output_tokens": 2,
    "cancelled": 3,
    "interrupted": 3,
    "cached_tokens": 4,
    "reasoning_tokens": 4,
}


def _usage_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        since = parse_time(args.since, option="--since") if args.since else None
        until = parse_time(args.until, option="--until") if args.until else None
        if since is not None and until is not None and since >= until:
            raise UsageError(f"--since {args.since!r} is not before --until {args.until!r}")
        check_by(args.by)
        fmt = chosen_format(args.format)
        engine = await catch_up(args.store, "usage", apply=args.catch_up)
        try:
            report = await usage_report(engine, args.by, since, until)
        finally:
            await engine.dispose()
        header = [
            "calls",
            "succeeded",
            "failed",
            "cancelled",
            "interrupted",
            "unpriced_calls",
            *COUNTERS,
            "cost_usd",
        ]
        columns = [
            Column(args.by),
            *(Column(h, numeric=True, priority=_USAGE_PRIORITY[h]) for h in header),
        ]
        for_people = fmt in ("table", "plain")

        def cells(line: UsageLine, key: str) -> list[Any]:
            values = line.as_dict()
            cost = values["cost_usd"]
            if for_people and cost is None and line.calls:
                cost = "unpriced"  # never a blank that reads as $0
            return [key, *(values[h] for h in header[:-1]), cost]

        rows = [cells(line, line.key) for line in report]
        total = UsageLine(key="total")
        for item in report:
            total.add(item)
        footer = cells(total, "total") if for_people and len(report) > 1 else None
        notes = []
        if total.unpriced_calls:
            notes.append(
                f"cost_usd leaves out {total.unpriced_calls} unpriced call"
                f"{'s' if total.unpriced_calls != 1 else ''} (models without a known price; "
                "add them to LLMTRAIL_PRICES_FILE, then `llmtrail projections rebuild`)"
            )
        emit_rows(columns, rows, fmt, title="usage", footer=footer, notes=notes)
        return 0

    return _guarded("usage", main)


# -- sql -----------------------------------------------------------------------------------------


def _sql_columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Column]:
    """Numbers right-aligned; text may wrap; the rightmost columns are hidden first."""
    columns = []
    for index, name in enumerate(header):
        values = [row[index] for row in rows if row[index] is not None]
        numeric = bool(values) and all(
            isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in values
        )
        columns.append(Column(name, numeric=numeric, priority=index, wrap=not numeric))
    return columns


def _sql_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        fmt = chosen_format(args.format)
        await (await catch_up(args.store, "sql", apply=args.catch_up, required=False)).dispose()
        limits = ReadOnlyLimits(args.timeout, args.max_rows, args.allow_privileged_role)
        header, rows = await run_readonly_sql(args.store, args.statement, limits)
        if header:
            emit_rows(_sql_columns(header, rows), rows, fmt)
        return 0

    return _guarded("sql", lambda: stop_on_signal("sql", main()))

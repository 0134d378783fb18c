"""The store's commands: ``llmtrail migrate`` and ``llmtrail events``.

Invariants:
- :func:`register` only adds parsers; nothing is opened until a command runs.
- Every command returns an exit code: 0 ok, 1 failure (store unreachable, schema unknown),
  2 bad usage (bad URL, bad time, missing store). Errors are one line on stderr, never a
  traceback.
- ``--store URL`` defaults to ``$LLMTRAIL_STORE_URL``, then ``sqlite+aiosqlite:///llmtrail.db``,
  resolved when the arguments are parsed (:func:`add_store_argument`, shared by the other
  storage commands).
- Reading commands never create or migrate a store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrail.pipeline import ConfigurationError, EventType

from ._engine import STORE_URL_ENV, StoreError, mask_url, store_url_from_environment
from ._migrate import head_revision, migrate
from ._reader import EventStore, IncompleteCall, StoredEvent

__all__ = ["add_store_argument", "parse_time", "register", "run_command"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_HELP = (
    "an ISO 8601 time (2025-05-01T12:00:00Z; UTC unless it has an offset) "
    "or an age (30s, 15m, 2h, 7d)"
)


class UsageError(ConfigurationError):
    """A command-line value is invalid (exit code 2)."""


def _store_url(value: str) -> str:
    return store_url_from_environment(value or None)


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--store URL`` (default ``$LLMTRAIL_STORE_URL``, then ``llmtrail.db``)."""
    parser.add_argument(
        "--store",
        metavar="URL",
        type=_store_url,
        # A string default goes through `type` at parse time, so the environment is read
        # when the command runs, not when the parser was built.
        default="",
        help=f"event store URL (default: ${STORE_URL_ENV}, then sqlite+aiosqlite:///llmtrail.db)",
    )


def parse_time(value: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """An ISO 8601 time (naive means UTC) or an age such as ``15m`` (that long before now)."""
    match = _DURATION.match(value)
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return (now or datetime.now(UTC)) - timedelta(seconds=amount * _UNITS[unit])
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(f"{option} {value!r} is not a time: use {_TIME_HELP}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def run_command(name: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine; turn llmtrail's errors into one line and an exit code."""
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `llmtrail events | head`
        return 0
    except ConfigurationError as exc:
        print(f"llmtrail {name}: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"llmtrail {name}: error: {exc}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` and ``events`` to the ``llmtrail`` command line."""
    migrate_parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the event store's schema",
        description="Run the Alembic migrations on the store (creating it if needed).",
    )
    add_store_argument(migrate_parser)
    migrate_parser.add_argument(
        "--revision", default="head", help="target revision (default: head)"
    )
    migrate_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    migrate_parser.set_defaults(func=_migrate_command)

    events_parser = subparsers.add_parser(
        "events",
        help="show stored lifecycle events",
        description="Show lifecycle events from the store, in position order. Filters combine.",
    )
    add_store_argument(events_parser)
    events_parser.add_argument("--call", metavar="ID", help="only this call_id")
    events_parser.add_argument("--trace", metavar="ID", help="only this trace_id")
    events_parser.add_argument(
        "--type",
        metavar="T",
        action="append",
        help=f"only this event type (repeatable): {', '.join(t.value for t in EventType)}",
    )
    events_parser.add_argument(
        "--since", metavar="TIME", help=f"occurred at or after: {_TIME_HELP}"
    )
    events_parser.add_argument("--until", metavar="TIME", help=f"occurred before: {_TIME_HELP}")
    events_parser.add_argument(
        "--limit", metavar="N", type=int, help="at most N events (with --follow: stop after N)"
    )
    events_parser.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new events as they are stored (from the end, or from --since)",
    )
    events_parser.add_argument(
        "--poll", metavar="S", type=float, default=0.5, help="--follow poll interval (0.5)"
    )
    events_parser.add_argument(
        "--incomplete",
        action="store_true",
        help="list calls that started but never completed (in flight, or their process died), "
        "with their last event, attempt, and whether a request was sent",
    )
    events_parser.add_argument("--json", action="store_true", help="JSON lines, for scripts")
    events_parser.set_defaults(func=_events_command)


# -- migrate ----------------------------------------------------------------------------


def _migrate_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        before, after = await migrate(args.store, args.revision)
        shown = mask_url(args.store)
        if args.json:
            print(
                json.dumps({"store": shown, "from": before, "to": after, "head": head_revision()})
            )
        elif before == after:
            print(f"{shown}: already at revision {after}")
        else:
            print(f"{shown}: migrated from {before or 'empty'} to {after}")
        return 0

    return run_command("migrate", main)


# -- events -----------------------------------------------------------------------------


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    types = None
    if args.type:
        types = [item.strip() for value in args.type for item in value.split(",") if item.strip()]
        valid = {t.value for t in EventType}
        for item in types:
            if item not in valid:
                raise UsageError(
                    f"--type {item!r} is not an event type: use one of {sorted(valid)}"
                )
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} is invalid: use an integer >= 1")
    if args.poll <= 0:
        raise UsageError(f"--poll {args.poll} is invalid: use seconds > 0")
    return {
        "type": types,
        "call_id": args.call,
        "trace_id": args.trace,
        "since": parse_time(args.since, option="--since") if args.since else None,
        "until": parse_time(args.until, option="--until") if args.until else None,
    }


def _summary(payload: dict[str, Any], width: int = 70) -> str:
    parts = [
        f"{key}={value}"
        for key, value in payload.items()
        if value is not None and not isinstance(value, dict | list) and value != ""
    ]
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def _line(stored: StoredEvent) -> str:
    event = stored.event
    at = event.occurred_at.isoformat(timespec="milliseconds")
    return (
        f"{stored.position:>8}  {at}  {event.call_id}  {event.seq:>2}  "
        f"{event.type.value:<18}  {_summary(event.payload)}"
    )


def _print_table(rows: list[StoredEvent], *, incomplete: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="calls without a completed event" if incomplete else None)
    table.add_column("position", justify="right", no_wrap=True)
    table.add_column("occurred_at (UTC)", no_wrap=True)
    table.add_column("call_id", no_wrap=True)  # whole, so `| grep <id>` finds it
    if incomplete:
        table.add_column("operation")
        table.add_column("model")
    else:
        table.add_column("seq", justify="right", no_wrap=True)
        table.add_column("type", no_wrap=True)
        table.add_column("details", overflow="fold")
    for stored in rows:
        event = stored.event
        at = event.occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if incomplete:
            table.add_row(
                str(stored.position),
                at,
                event.call_id,
                str(event.payload.get("operation_name") or ""),
                str(event.payload.get("model") or ""),
            )
        else:
            table.add_row(
                str(stored.position),
                at,
                event.call_id,
                str(event.seq),
                event.type.value,
                _summary(event.payload),
            )
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} event{'s' if len(rows) != 1 else ''}", style="dim")


def _events_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        filters = _filters(args)
        store = await EventStore.open(args.store)
        try:
            if args.incomplete:
                found = await store.incomplete_summaries()
                _emit_incomplete(found[: args.limit] if args.limit else found, args)
            elif args.follow:
                await _follow(store, args, filters)
            else:
                rows = []
                async for stored in store.scan(**filters):
                    rows.append(stored)
                    if args.limit and len(rows) >= args.limit:
                        break
                _emit(rows, args, incomplete=False)
        finally:
            await store.aclose()
        return 0

    return run_command("events", main)


def _emit(rows: list[StoredEvent], args: argparse.Namespace, *, incomplete: bool) -> None:
    if args.json:
        out = sys.stdout
        for stored in rows:
            out.write(json.dumps(stored.to_dict(), default=str) + "\n")
        out.flush()
    else:
        _print_table(rows, incomplete=incomplete)


def _emit_incomplete(found: list[IncompleteCall], args: argparse.Namespace) -> None:
    if args.json:
        for call in found:
            sys.stdout.write(json.dumps(call.to_dict()) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="calls without a completed event")
    for name in ("started (UTC)", "call_id", "operation", "model", "last event", "attempt"):
        table.add_column(name, no_wrap=name != "operation")
    table.add_column("sent")
    for call in found:
        at = call.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        row = (at, call.call_id, call.operation_name, call.model, call.last_event, call.attempt)
        table.add_row(*("" if v is None else str(v) for v in row), "yes" if call.sent else "no")
    console = Console()
    console.print(table)
    console.print(f"{len(found)} call{'s' if len(found) != 1 else ''}", style="dim")


async def _follow(store: EventStore, args: argparse.Namespace, filters: dict[str, Any]) -> None:
    # Like `tail -f`: from the end of the log, unless --since asks for older events.
    start = 0 if filters["since"] is not None else await store.last_position()
    printed = 0
    async for stored in store.follow(start, poll_s=args.poll, **filters):
        if args.json:
            print(json.dumps(stored.to_dict(), default=str), flush=True)
        else:
            print(_line(stored), flush=True)
        printed += 1
        if args.limit and printed >= args.limit:
            return

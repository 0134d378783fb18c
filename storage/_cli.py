"""The store's commands: ``llmtrail migrate`` and ``llmtrail events``.

Invariants:
- :func:`register` only adds parsers; nothing is opened until a command runs.
- Every command returns an exit code: 0 ok, 1 failure (store unreachable, schema unknown),
  2 bad usage (bad URL, bad time, missing store), 130 after Ctrl-C. Errors are one line on
  stderr, never a traceback; a closed pipe (``| head``) ends the command quietly with 0.
- ``events`` streams: it reads a page at a time (newest first unless ``--oldest-first``) and
  prints each event as it is read, so it never holds the log in memory; at most ``--limit``
  (100) events unless ``--all``. One event is one whole line in a pipe (every payload field,
  quoted when it has spaces), a head line and wrapped details on a terminal, or JSON.
- ``--store URL`` defaults to ``$LLMTRAIL_STORE_URL``, then ``sqlite+aiosqlite:///llmtrail.db``,
  resolved when the arguments are parsed (:func:`add_store_argument`, shared by the other
  storage commands).
- Reading commands never create or migrate a store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from llmtrail.pipeline import ConfigurationError, EventType
from llmtrail.pipeline._output import Column, add_format_options, chosen_format, emit_rows

from ._base import STORE_URL_ENV, StoreError, mask_url, store_url_from_environment

if TYPE_CHECKING:  # the reader (SQLAlchemy) is imported when a command runs, not by the parser
    from ._reader import EventStore, IncompleteCall, StoredEvent

__all__ = ["add_store_argument", "parse_time", "register", "run_command"]

DEFAULT_LIMIT = 100
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
    """Run a command's coroutine; turn llmtrail's errors into one line and an exit code
    (130 after Ctrl-C)."""
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmtrail events | head`: the reader has all it wants
        # Python flushes stdout again at exit; point it at /dev/null so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
    migrate_parser.add_argument(
        "--reader-role",
        metavar="NAME",
        help="PostgreSQL: also create (or re-grant) NAME, a login role that can only SELECT "
        "the store, for `llmtrail sql` (see docs/sql.md)",
    )
    migrate_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    migrate_parser.set_defaults(func=_migrate_command)

    events_parser = subparsers.add_parser(
        "events",
        help="show stored lifecycle events, newest first",
        description="Show lifecycle events from the store, newest first, at most --limit "
        "(default 100). Filters combine. On a terminal each event takes a line for its time, "
        "type and call, and the details wrap below; in a pipe each event is one line; --json "
        "gives one JSON object a line. Events are read a page at a time, so `| head` is quick.",
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
        "--limit",
        metavar="N",
        type=int,
        default=None,
        help=f"at most N events (default {DEFAULT_LIMIT}; 0: all; with --follow: stop after N, "
        "default no limit; with --incomplete: every such call unless N is given)",
    )
    events_parser.add_argument(
        "--all", action="store_const", dest="limit", const=0, help="every event (--limit 0)"
    )
    events_parser.add_argument(
        "--oldest-first", action="store_true", help="from the oldest matching event on"
    )
    events_parser.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new events as they are stored, oldest first (from the end, or "
        "from --since)",
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
    add_format_options(events_parser, formats=("wrapped", "plain", "json"))
    events_parser.set_defaults(func=_events_command)


# -- migrate ----------------------------------------------------------------------------


def _migrate_command(args: argparse.Namespace) -> int:
    # Alembic loads when a migration runs, not when the parser is built (`llmtrail --help`).
    from ._migrate import create_reader_role, head_revision, migrate

    async def main() -> int:
        before, after = await migrate(args.store, args.revision)
        if args.reader_role:
            await create_reader_role(args.store, args.reader_role)
        shown = mask_url(args.store)
        if args.json:
            print(
                json.dumps(
                    {
                        "store": shown,
                        "from": before,
                        "to": after,
                        "head": head_revision(),
                        "reader_role": args.reader_role,
                    }
                )
            )
        elif before == after:
            print(f"{shown}: already at revision {after}")
        else:
            print(f"{shown}: migrated from {before or 'empty'} to {after}")
        if args.reader_role and not args.json:
            print(f"reader role {args.reader_role}: can log in and SELECT the store, nothing more")
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
    if args.limit is None:
        args.limit = 0 if args.follow or args.incomplete else DEFAULT_LIMIT
    elif args.limit < 0:
        raise UsageError(f"--limit {args.limit} is invalid: use an integer >= 0 (0: all)")
    if args.poll <= 0:
        raise UsageError(f"--poll {args.poll} is invalid: use seconds > 0")
    return {
        "type": types,
        "call_id": args.call,
        "trace_id": args.trace,
        "since": parse_time(args.since, option="--since") if args.since else None,
        "until": parse_time(args.until, option="--until") if args.until else None,
    }


def _value(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    text = str(value)
    # Quoted when it has spaces, like logfmt, so `key=value` pairs stay one token each.
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def _details(payload: dict[str, Any]) -> str:
    """Every field of the payload, whole: error messages included, nothing cut."""
    return " ".join(
        f"{key}={_value(value)}" for key, value in payload.items() if value not in (None, "")
    )


def _line(stored: StoredEvent) -> str:
    """One event, one line: for pipes, grep and awk."""
    event = stored.event
    at = event.occurred_at.isoformat(timespec="milliseconds")
    return (
        f"{stored.position:>8}  {at}  {event.call_id}  {event.seq:>2}  "
        f"{event.type.value:<18}  {_details(event.payload)}"
    ).rstrip()


class _Printer:
    """Prints events as they are read, in the chosen format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.count = 0
        self._day: str | None = None
        self._width = shutil.get_terminal_size().columns

    def __call__(self, stored: StoredEvent) -> None:
        self.count += 1
        out = sys.stdout
        if self.fmt == "json":
            out.write(json.dumps(stored.to_dict(), default=str) + "\n")
        elif self.fmt == "plain":
            out.write(_line(stored) + "\n")
        else:
            out.write(self._wrapped(stored))
        out.flush()

    def _wrapped(self, stored: StoredEvent) -> str:
        """For people at any width: time, type and the whole call id on one line (69
        characters), then the details wrapped below; a date line when the day changes."""
        event = stored.event
        day = event.occurred_at.date().isoformat()
        head = "" if day == self._day else f"-- {day} (UTC) --\n"
        self._day = day
        clock = event.occurred_at.strftime("%H:%M:%S.%f")[:-3]
        first = f"{clock}  {event.type.value:<18}  {event.call_id} #{event.seq}"
        details = textwrap.fill(
            f"position={stored.position} {_details(event.payload)}".rstrip(),
            width=max(self._width, 40),
            initial_indent="    ",
            subsequent_indent="    ",
            break_long_words=True,
            break_on_hyphens=False,
        )
        return f"{head}{first}\n{details}\n"


def _events_command(args: argparse.Namespace) -> int:
    async def main() -> int:
        filters = _filters(args)
        fmt = chosen_format(args.format, terminal="wrapped")
        printer = _Printer(fmt)
        from ._reader import EventStore

        store = await EventStore.open(args.store)
        try:
            if args.incomplete:
                found = await store.incomplete_summaries()
                _emit_incomplete(found[: args.limit] if args.limit else found, fmt)
            elif args.follow:
                await _follow(store, args, filters, printer)
            else:
                async for stored in store.scan(
                    newest_first=not args.oldest_first,
                    page_size=min(args.limit or 1_000, 1_000),
                    **filters,
                ):
                    printer(stored)
                    if printer.count == args.limit:
                        break
        finally:
            await store.aclose()
        if printer.count == 0 and fmt != "json":
            print("llmtrail events: no events match", file=sys.stderr)
        return 0

    return run_command("events", main)


def _emit_incomplete(found: list[IncompleteCall], fmt: str) -> None:
    """The calls without ``completed``: JSON lines, or a table / plain lines."""
    if fmt == "json":
        for call in found:
            sys.stdout.write(json.dumps(call.to_dict()) + "\n")
        sys.stdout.flush()
        return
    columns = [
        Column("started (UTC)", priority=0),
        Column("call_id", priority=0),
        Column("operation", priority=2, wrap=True),
        Column("model", priority=3),
        Column("last event", priority=1),
        Column("attempt", numeric=True, priority=1),
        Column("sent", priority=1),
    ]
    rows = [
        [
            call.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            call.call_id,
            call.operation_name,
            call.model,
            call.last_event,
            call.attempt,
            "yes" if call.sent else "no",
        ]
        for call in found
    ]
    plural = "s" if len(found) != 1 else ""
    emit_rows(
        columns,
        rows,
        "plain" if fmt == "plain" else "table",
        title="calls without a completed event",
        notes=[f"{len(found)} call{plural} without a completed event"],
    )


async def _follow(
    store: EventStore, args: argparse.Namespace, filters: dict[str, Any], printer: _Printer
) -> None:
    # Like `tail -f`: from the end of the log, unless --since asks for older events.
    start = 0 if filters["since"] is not None else await store.last_position()
    async for stored in store.follow(start, poll_s=args.poll, **filters):
        printer(stored)
        if printer.count == args.limit:
            return

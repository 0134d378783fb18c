"""The audit commands: ``llmtrail projections run|rebuild|status``, ``usage`` and ``sql``.

Invariants:
- :func:`register` only adds parsers and imports nothing heavy: the commands themselves are
  in :mod:`._audit_commands` (SQLAlchemy, the projections, the read-only runner), imported
  when one runs, so building the ``llmtrail`` parser stays fast.
- Exit codes: 0 ok, 1 failure (store unreachable, SQL error, timeout), 2 bad usage (bad option,
  bad URL, missing store, a statement ``sql`` refuses). Errors are one line on stderr, never a
  traceback.
- ``usage`` and ``sql`` bring the projections up to date first, then read them (with
  ``--no-catch-up`` they read them as they are and say on stderr how far behind they are);
  money is summed as ``Decimal`` in Python, never as a float in SQL, and printed exactly.
  A cost that leaves out unpriced calls says so; an unpriced group reads ``unpriced``, never 0.
- Output goes through ``llmtrail.pipeline._output``: ``--json`` everywhere, ``--format``
  where there are more formats, tables that fit the terminal.
- ``sql`` runs through :mod:`._readonly` (its invariants: read-only in effect, bounded in time,
  cancelled on the server by Ctrl-C); a refused statement exits 2, a timeout 1, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from llmtrail.pipeline._output import add_format_options

from ._base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    PROJECTIONS,
    REBUILD_BATCH_SIZE,
)
from ._cli import add_store_argument

__all__ = ["register"]


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
    add_format_options(run, formats=("plain", "json"))
    run.set_defaults(func=_later("_run_command"))

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
    add_format_options(rebuild_parser, formats=("plain", "json"))
    rebuild_parser.set_defaults(func=_later("_rebuild_command"))

    status = actions.add_parser(
        "status",
        help="checkpoints and lag",
        description="Each projection's checkpoint, the "
        "head of the log and how many events the projection lags behind.",
    )
    add_store_argument(status)
    add_format_options(status)
    status.set_defaults(func=_later("_status_command"))

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
    add_catch_up_option(usage)
    add_format_options(usage)
    usage.set_defaults(func=_later("_usage_command"))

    sql = subparsers.add_parser(
        "sql",
        help="run one read-only SQL statement",
        description="Run one SQL statement against the store, read-only (see docs/sql.md for "
        "the schema and ready queries). Statements that would write are refused. The "
        "projections (calls, usage_daily, metrics_minute) are brought up to date first.",
    )
    add_store_argument(sql)
    sql.add_argument("statement", metavar="SQL", help='e.g. "SELECT * FROM usage_daily"')
    add_catch_up_option(sql)
    add_format_options(sql)
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
    sql.set_defaults(func=_later("_sql_command"))


def add_catch_up_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-catch-up",
        dest="catch_up",
        action="store_false",
        help="read the projections as they are, without applying new events first (says on "
        "stderr how far behind they are)",
    )


def _later(name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of :mod:`._audit_commands`, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module("._audit_commands", __package__), name
        )
        return command(args)

    return run

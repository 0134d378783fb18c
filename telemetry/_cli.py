"""``llmtrail traces export``: rebuild span trees from the event store and send them by OTLP.

Invariants:
- Reads only: the store is never written. Only calls whose stream is complete are exported
  (see :mod:`telemetry._export`); the others are counted and reported as skipped.
- Errors are one line on stderr and exit code 1 (2 for bad usage), never a traceback. The
  OTLP exporter's own retry warnings are silenced: the command reports the outcome once.
- ``register`` is the ``llmtrail.commands`` entry point; importing this module does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrail.pipeline import ConfigurationError, Event

__all__ = ["parse_time", "register"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2025-03-01T12:00:00Z``, ``2025-03-01`` (UTC when no zone is given), or a duration
    back from now: ``30s``, ``15m``, ``2h``, ``1d``, ``1w``."""
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2025-03-01T12:00:00Z) or a duration "
            "back from now (30s, 15m, 2h, 1d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def register(subparsers: Any) -> None:
    """Add ``traces export`` to the ``llmtrail`` command line."""
    traces = subparsers.add_parser(
        "traces",
        help="OpenTelemetry traces rebuilt from the event store",
        description="OpenTelemetry traces rebuilt from the event store.",
    )
    commands = traces.add_subparsers(dest="traces_command", metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="rebuild span trees from stored events and export them by OTLP",
        description=(
            "Rebuilds, from stored events alone, the span tree of every completed call that "
            "matches (same trace and span ids, names, attributes and times as the live spans) "
            "and exports it by OTLP: backfill after a collector outage. The endpoint defaults "
            "to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, then "
            "http://localhost:4318."
        ),
    )
    which = export.add_mutually_exclusive_group()
    which.add_argument("--call", metavar="ID", help="only this call")
    which.add_argument("--trace", metavar="ID", help="only the calls of this trace")
    which.add_argument(
        "--since", metavar="TIME", type=parse_time, help="calls started at or after TIME"
    )
    export.add_argument(
        "--until", metavar="TIME", type=parse_time, help="calls started before TIME"
    )
    export.add_argument(
        "--endpoint", metavar="URL", help="OTLP endpoint, e.g. http://localhost:4318"
    )
    export.add_argument(
        "--protocol",
        choices=["http/protobuf", "grpc"],
        help="OTLP protocol (default: OTEL_EXPORTER_OTLP_PROTOCOL, then http/protobuf)",
    )
    export.add_argument(
        "--service-name",
        metavar="NAME",
        help=(
            "service.name of the exported spans (default: the name stored with each call, "
            "then OTEL_SERVICE_NAME, then llmtrail)"
        ),
    )
    export.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="export timeout in seconds"
    )
    export.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_store_argument(export)
    export.set_defaults(func=_export_command)
    traces.set_defaults(func=lambda _args: _usage(traces))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="event store URL (default: LLMTRAIL_STORE_URL, then sqlite+aiosqlite:///llmtrail.db)",
    )


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _quiet_exporter() -> Iterator[_Collect]:
    """Keep the exporter's per-retry log lines off the terminal, but collect them: the
    command reports the outcome once, with the exporter's last word as the reason."""
    logger = logging.getLogger("opentelemetry.exporter")
    collect = _Collect()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(collect)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield collect
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
        logger.setLevel(level)


async def _load_events(args: argparse.Namespace) -> list[Event]:
    from ._store import read_events

    return await read_events(
        args.store, call_id=args.call, trace_id=args.trace, since=args.since, until=args.until
    )


def _export_command(args: argparse.Namespace) -> int:
    from ._config import otlp_span_exporter
    from ._export import ExportError, export_traces

    if args.since and args.until and args.until <= args.since:
        raise ConfigurationError(
            f"--until {args.until.isoformat()} is not after --since {args.since.isoformat()}: "
            "swap them or widen the range"
        )
    if args.timeout <= 0:
        raise ConfigurationError(f"--timeout {args.timeout} is invalid: use seconds > 0")
    from sqlalchemy.exc import SQLAlchemyError

    try:
        events = asyncio.run(_load_events(args))
    except SQLAlchemyError as exc:
        # The store's own errors (missing file, no schema) are LLMTrailErrors that the CLI
        # reports itself; a database error is reduced to its first line here.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"llmtrail traces export: error: cannot read the event store: {first}", file=sys.stderr
        )
        return 1
    exporter = otlp_span_exporter(args.endpoint, args.protocol, timeout=args.timeout)
    try:
        with _quiet_exporter() as exporter_log:
            summary = export_traces(events, exporter, service_name=args.service_name)
    except ExportError as exc:
        where = args.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint (default localhost:4318)"
        last = exporter_log.messages[-1:]
        reason = f" (exporter: {last[0]})" if last else ""
        print(f"llmtrail traces export: error: {exc}, at {where}{reason}", file=sys.stderr)
        return 1
    finally:
        exporter.shutdown()
    if args.json:  # one JSON object, also when nothing matched
        print(
            json.dumps(
                {
                    "spans": summary.spans,
                    "traces": summary.traces,
                    "calls": summary.calls,
                    "skipped": summary.skipped,
                }
            )
        )
    else:
        if summary.calls == 0:
            line = "nothing to export: no completed call matched"
        else:
            line = (
                f"exported {summary.spans} spans in {summary.traces} traces "
                f"({summary.calls} completed calls)"
            )
        if summary.skipped:
            line += f"; skipped {summary.skipped} calls without a completed event"
        print(line)
    return 0

"""The two readers of workloads, both folding into one ``WorkloadBuilder``.

- :func:`extract_workload` folds any iterable of :class:`pipeline.Event` (tests, other stores).
- :func:`load_workload` reads the SQL event store, one query per event type. Each type's
  ``FIELDS`` come out of SQL as one JSON array per row (SQLite's multi-path ``json_extract``,
  PostgreSQL's ``jsonb_build_array``): the payload is parsed once, in C, and Python decodes a
  short array instead of the whole payload.

Invariants:
- Timestamps come out as exact epoch seconds. On SQLite the stored text is
  ``YYYY-MM-DD HH:MM:SS.ffffff``: whole seconds from ``strftime('%s')`` of the text *without*
  its fraction, plus the fraction. (``strftime('%s')`` of the full text rounds to the
  millisecond first, so a fraction of .9995 s or more came out a second late.)
- The store is only read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Float, Text, cast, extract, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail.pipeline import Event, EventType

from ._folds import paused_gc
from ._schema import events
from ._workload import EmptyWorkloadError, Workload, epoch_of
from ._workload_build import FIELDS, WorkloadBuilder, pick

__all__ = ["extract_workload", "load_workload"]

# -- from events ------------------------------------------------------------------------------


def extract_workload(
    stream: Iterable[Event],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Workload:
    """The workload of the calls whose ``trace_created`` lies in ``[since, until)``."""
    since, until = _utc(since), _utc(until)
    builder = WorkloadBuilder()
    created = str(EventType.TRACE_CREATED)
    for event in stream:
        kind = str(event.type)
        paths = FIELDS.get(kind)
        if paths is None:
            continue
        if kind == created:
            at = _utc(event.occurred_at)
            assert at is not None
            if (since is not None and at < since) or (until is not None and at >= until):
                continue
        row = (event.call_id, epoch_of(event.occurred_at), pick(event.payload, paths))
        builder.add(kind, (row,))
    return builder.build()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- from the SQL store ---

_TYPES = (
    EventType.TRACE_CREATED,
    EventType.SENT,
    EventType.RECEIVED,
    EventType.ATTEMPT_FAILED,
    EventType.RETRY_SCHEDULED,
    EventType.UNMARKED,
    EventType.COMPLETED,
)


def _sqlite_path(path: str) -> str:
    """``a.b-c`` -> ``$.a."b-c"``: keys with characters JSON paths do not allow are quoted."""
    parts = [p if p.replace("_", "").isalnum() else f'"{p}"' for p in path.split(".")]
    return "$." + ".".join(parts)


def _columns(dialect: str, paths: Sequence[str]) -> tuple[Any, Any]:
    """(epoch seconds, JSON array text of the values at ``paths``) for one dialect."""
    at, payload = events.c.occurred_at, events.c.payload
    if dialect == "postgresql":
        parts = [payload[tuple(p.split("."))] if "." in p else payload[p] for p in paths]
        return cast(extract("epoch", at), Float), cast(func.jsonb_build_array(*parts), Text)
    # Whole seconds of the text cut before its fraction (no rounding), plus the fraction.
    whole = func.strftime("%s", func.substr(at, 1, 19))
    epoch: Any = cast(whole, Float) + cast(func.substr(at, 20), Float)
    json_paths = [_sqlite_path(p) for p in paths]
    if len(json_paths) == 1:  # json_extract returns a bare value for a single path
        return epoch, func.json_array(func.json_extract(payload, json_paths[0]))
    return epoch, func.json_extract(payload, *json_paths)


def _query(dialect: str, kind: EventType, since: datetime | None, until: datetime | None) -> Any:
    epoch, values = _columns(dialect, FIELDS[str(kind)])
    stmt = select(events.c.call_id, epoch, values).where(events.c.type == str(kind))
    # A call's later events may fall after `until`; they are matched to it by call_id.
    if since is not None:
        stmt = stmt.where(events.c.occurred_at >= since)
    if until is not None and kind is EventType.TRACE_CREATED:
        stmt = stmt.where(events.c.occurred_at < until)
    return stmt


async def load_workload(
    engine: AsyncEngine,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> Workload:
    """Read the workload of ``[since, until)`` from the event store behind ``engine``.

    One query per event type; ``on_progress(event_type, rows)`` is called after each.
    """
    since, until = _utc(since), _utc(until)
    builder = WorkloadBuilder()
    loads = orjson.loads
    with paused_gc():
        async with engine.connect() as conn:
            dialect = conn.dialect.name
            for kind in _TYPES:
                result = await conn.execute(_query(dialect, kind, since, until))
                rows = result.all()
                builder.add(str(kind), ((cid, at, loads(values)) for cid, at, values in rows))
                del result, rows  # free each type's rows before reading the next
                if on_progress is not None:
                    on_progress(str(kind), len(builder))
                if kind is EventType.TRACE_CREATED and not len(builder):
                    break
        if len(builder):
            return builder.build()
    window = f"from {since.isoformat() if since else 'the beginning'} to " + (
        until.isoformat() if until else "now"
    )
    raise EmptyWorkloadError(
        f"the store has no recorded calls {window}; widen --since/--until, or record "
        "some traffic first (e.g. `llmtrail demo`)"
    )

"""The event store's tables, as SQLAlchemy Core objects for building queries.

Invariants:
- These objects describe the schema; they never create it. The schema is created only by the
  Alembic migrations in ``migrations/`` (revision ``0001_events`` creates ``events``).
- ``events.position`` is the global order: monotonic, not necessarily contiguous. Readers page
  with ``position > cursor``. On SQLite it is the rowid (``INTEGER PRIMARY KEY``), on
  PostgreSQL a ``BIGSERIAL``.
- ``event_id`` is unique (idempotent appends) and ``(call_id, seq)`` is unique (one stream per
  call, no duplicate step).
- Timestamps read back from any backend are timezone-aware UTC; SQLite, which stores them as
  naive text, gets UTC written in and the zone attached on the way out by :class:`UTCDateTime`.
- PostgreSQL's JSONB cannot hold the character U+0000. A payload that contains it is stored
  with every string escaped (U+E000 -> U+E000 U+E000, U+0000 -> U+E000 "0") and the top-level
  key ``llmtrail_nul_escaped: true``; :func:`stored_payload` undoes it, so a payload reads
  back exactly as emitted. Nothing else is ever escaped.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "NUL_ESCAPED_KEY",
    "UTCDateTime",
    "escape_nul",
    "events",
    "metadata",
    "stored_payload",
]

# Explicit constraint names keep the DDL identical on both backends and let later migrations
# refer to the constraints by name.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware ``DateTime`` that is always UTC on the way in and out.

    SQLite keeps datetimes as naive text and compares them as text, so a value in another zone
    would compare wrongly; converting every bound value to UTC first keeps ``since``/``until``
    filters right, and attaching UTC to naive results gives callers one kind of datetime.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - SQLAlchemy parses SQLite's text
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


PAYLOAD_TYPE = JSON().with_variant(JSONB(), "postgresql")

events = Table(
    "events",
    metadata,
    Column(
        "position",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("event_id", Text, nullable=False),
    Column("call_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", Text, nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    # 32 and 16 hex digits; declared as plain TEXT because PostgreSQL rejects TEXT(n).
    Column("trace_id", Text),
    Column("span_id", Text),
    Column("instance", Text),
    Column("payload", PAYLOAD_TYPE),
    Column("recorded_at", UTCDateTime, server_default=func.now()),
    UniqueConstraint("event_id", name="uq_events_event_id"),
    UniqueConstraint("call_id", "seq", name="uq_events_call_id_seq"),
    Index("ix_events_trace_id", "trace_id"),
    Index("ix_events_type", "type"),
    Index("ix_events_occurred_at", "occurred_at"),
    # AUTOINCREMENT: SQLite never hands out a rowid twice, so positions stay monotonic even
    # if the newest row were ever deleted.
    sqlite_autoincrement=True,
)


NUL_ESCAPED_KEY = "llmtrail_nul_escaped"
_ESC = "\ue000"  # a private-use character: the escape of the NUL encoding below
_ESCAPED = re.compile("\ue000(.)", re.DOTALL)


def _map_strings(value: Any, change: Any) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {_map_strings(k, change): _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(item, change) for item in value]
    return value


def _escape(text: str) -> str:
    return text.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def _unescape(text: str) -> str:
    if _ESC not in text:
        return text
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), text)


def escape_nul(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` in the form PostgreSQL's JSONB can hold (see the module invariants)."""
    escaped: dict[str, Any] = _map_strings(payload, _escape)
    escaped[NUL_ESCAPED_KEY] = True
    return escaped


def stored_payload(value: Any) -> dict[str, Any]:
    """A payload as read from the ``payload`` column, exactly as it was emitted."""
    if not isinstance(value, dict):
        return {}
    if value.get(NUL_ESCAPED_KEY) is not True:
        return value
    restored: dict[str, Any] = _map_strings(
        {k: v for k, v in value.items() if k != NUL_ESCAPED_KEY}, _unescape
    )
    return restored

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
"""

from __future__ import annotations

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

__all__ = ["UTCDateTime", "events", "metadata"]

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
    Index("ix_events_call_id", "call_id"),
    Index("ix_events_trace_id", "trace_id"),
    Index("ix_events_type", "type"),
    Index("ix_events_occurred_at", "occurred_at"),
    # AUTOINCREMENT: SQLite never hands out a rowid twice, so positions stay monotonic even
    # if the newest row were ever deleted.
    sqlite_autoincrement=True,
)

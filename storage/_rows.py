"""The rows of a batch: lifecycle events as one JSON array that one INSERT unpacks.

Invariants:
- A row is ``[event_id, call_id, seq, type, occurred_at, trace_id, span_id, instance,
  payload]`` (``_COLUMNS``); :func:`sqlite_insert` and :func:`postgresql_insert` unpack a
  batch of them (``json_each`` / ``jsonb_array_elements``) into one ``INSERT ... SELECT ... ON
  CONFLICT (event_id) DO NOTHING``, so a batch is idempotent.
- A payload is stored as the json module writes it with ``default=str`` (NaN and infinities
  by their names); only enum members, which it would write as ``str(member)``, are stored by
  value. orjson writes it, and the json module takes over wherever orjson would differ.
- On SQLite the payload travels as a JSON string (each ``json_extract`` parses the whole row,
  and a string parses far faster than the object it holds); on PostgreSQL as the object.
- An event the store cannot hold is refused here (counted in the batch, logged), and a payload
  JSON cannot hold is kept as its ``repr`` (logged): nothing is dropped silently.
- Text no UTF-8 encoder accepts (a lone surrogate, in an event that did not come through the
  pipeline's boundary) is stored with U+FFFD in its place (``pipeline._storable``), never as
  an escape no reader could decode again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    Integer,
    Text,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from llmtrail._log import get_logger
from llmtrail.pipeline import Event
from llmtrail.pipeline._storable import storable

from ._schema import escape_nul, events

__all__ = ["Batch", "RowEncoder", "postgresql_insert", "sqlite_insert"]

_log = get_logger(__name__)

_COLUMNS = (
    "event_id",
    "call_id",
    "seq",
    "type",
    "occurred_at",
    "trace_id",
    "span_id",
    "instance",
    "payload",
)
# The json module is the reference: what it writes (with ``default=str``) is what is stored.
_encode = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode
# orjson writes the same JSON several times faster. With these options it hands datetimes and
# dataclasses to _default as the json module does; what it refuses (non-str keys, integers
# beyond 64 bits, lone surrogates, deep nesting) goes to the json module instead.
_PAYLOAD_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_dumps = orjson.dumps
_Fragment = orjson.Fragment


def sqlite_insert(batch: str | None = None) -> Any:
    """``INSERT INTO events ... SELECT`` from the batch parameter (a JSON array), SQLite;
    ``batch`` gives the parameter a value (to compile it inline)."""
    elements = func.json_each(bindparam("batch", batch, type_=Text)).table_valued("value")
    value = elements.c.value
    # json_extract returns SQL values for the scalars and the payload's text (a JSON string).
    fields = [func.json_extract(value, literal_column(f"'$[{i}]'")) for i in range(len(_COLUMNS))]
    # SQLite keeps DateTime as naive UTC text, "2025-01-02 03:04:05.000006", which is how
    # SQLAlchemy binds it too, so that values compare as text. orjson writes a UTC datetime as
    # "2025-01-02T03:04:05.000006+00:00" ten times faster than isoformat(); the first 26
    # characters with a space for the T are that layout. (A datetime on the whole second,
    # which orjson writes without a fraction, arrives formatted: see RowEncoder.rows.)
    fields[4] = func.replace(func.substr(fields[4], 1, 26), "T", " ")
    # "WHERE true" is required: without it SQLite parses ON CONFLICT as part of the join.
    rows = select(*fields).select_from(elements).where(true())
    return (
        sqlite.insert(events)
        .from_select(list(_COLUMNS), rows)
        .on_conflict_do_nothing(index_elements=["event_id"])
    )


def postgresql_insert() -> Any:
    """The same for PostgreSQL (``jsonb_array_elements``)."""
    elements = func.jsonb_array_elements(
        cast(bindparam("batch", type_=Text), postgresql.JSONB)
    ).table_valued("value")
    value = elements.c.value

    def field(i: int) -> ColumnElement[Any]:
        return value.op("->>")(literal_column(str(i)))

    rows = select(
        field(0),
        field(1),
        cast(field(2), Integer),
        field(3),
        cast(field(4), DateTime(timezone=True)),
        field(5),
        field(6),
        field(7),
        value.op("->")(literal_column("8")),
    ).select_from(elements)
    return (
        postgresql.insert(events)
        .from_select(list(_COLUMNS), rows)
        .on_conflict_do_nothing(index_elements=["event_id"])
    )


@dataclass(slots=True)
class Batch:
    """Events taken off the queue together; ``parts`` are JSON texts of the valid ones."""

    size: int = 0  # events taken off the queue, valid or not
    events: list[Event] = field(default_factory=list)
    invalid: int = 0
    parts: list[str] = field(default_factory=list)

    def data(self) -> str:
        """The valid events as one JSON array."""
        return "[" + ",".join(self.parts) + "]"


def _utc(at: datetime) -> datetime:
    if at.tzinfo is UTC:
        return at
    if at.tzinfo is None:  # the envelope says UTC; a naive value is taken at its word
        return at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by their names: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _storable(value: Any) -> Any:
    """``value`` with its text made storable; as it is when it cannot be walked (a circular
    payload, which no JSON can hold either and is then kept as its repr)."""
    try:
        return storable(value)
    except RecursionError:
        return value


def _default(value: Any) -> Any:
    """What ``json.dumps(default=str)`` makes of a value orjson does not write itself."""
    if isinstance(value, float):  # a float subclass (numpy.float64): json writes the number
        return float(value)
    return str(value)


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value``: orjson writes those as null, silently."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return True
    for item in items:  # a plain loop: this runs for every payload that holds a null
        cls = type(item)
        if cls is str or cls is int or item is None or cls is bool:
            continue
        if cls is float:
            if not math.isfinite(item):
                return False
        elif not _all_finite(item):
            return False
    return True


class RowEncoder:
    """Turns events into rows and rows into JSON text, for one backend."""

    def __init__(self, *, postgresql: bool, instance: str | None, shown_url: str) -> None:
        self._postgresql = postgresql
        self._instance = instance
        self._shown_url = shown_url

    def encode_rows(self, rows: list[list[Any]]) -> str:
        """The rows as the inside of a JSON array (no brackets); each payload in place.

        On SQLite the payload goes in as a JSON *string*: each ``json_extract`` of a field
        parses the whole row, and a string is parsed far faster than the object it holds.
        PostgreSQL parses the batch once, so there it goes in as the object itself.
        """
        postgresql = self._postgresql
        texts: list[bytes] = []
        for row in rows:
            payload = row[8]
            try:
                text = _dumps(payload, default=_default, option=_PAYLOAD_OPTIONS)
            except TypeError:  # orjson's refusals (see _PAYLOAD_OPTIONS): the json module
                text = self._payload_json(row).encode()
            else:
                # orjson writes NaN and infinities as null; the json module writes their
                # names. JSONB refuses U+0000: such payloads are stored escaped (_schema).
                if (b"null" in text and not _all_finite(payload)) or (
                    postgresql and b"\\u0000" in text
                ):
                    text = self._payload_json(row).encode()
            texts.append(text)
            row[8] = _Fragment(text) if postgresql else text.decode()
        try:
            return _dumps(rows, default=_default).decode()[1:-1]
        except TypeError:  # an envelope field orjson refuses
            return ",".join(
                self._encode_row(row, text.decode()) for row, text in zip(rows, texts, strict=True)
            )

    def rows(self, chunk: list[Event], batch: Batch) -> list[list[Any]]:
        """The rows of ``chunk``; an event the store cannot hold is refused and logged."""
        instance = self._instance or None
        postgresql = self._postgresql
        rows: list[list[Any]] = []
        for e in chunk:
            try:
                at = _utc(e.occurred_at)
                # orjson writes the datetime as ISO 8601 with its offset: PostgreSQL parses
                # that, and SQLite's insert cuts it to its own layout (see sqlite_insert),
                # but for the whole second, which it writes without a fraction.
                stamp: datetime | str = at
                if not (postgresql or at.microsecond):
                    stamp = at.isoformat(" ", "microseconds")[:26]
                row = [
                    e.event_id,
                    e.call_id,
                    e.seq,
                    str(e.type),
                    stamp,
                    e.trace_id or None,
                    e.span_id or None,
                    e.instance or instance,
                    e.payload,
                ]
            except Exception as exc:
                batch.invalid += 1
                _log.error(
                    "event store refused an event",
                    store=self._shown_url,
                    error=f"{type(exc).__name__}: {exc}",
                    refused=repr(e)[:500],
                )
            else:
                rows.append(row)
                batch.events.append(e)
        return rows

    def _payload_json(self, row: list[Any]) -> str:
        """The payload by the json module: NaN and infinities by their names, U+0000 escaped
        for PostgreSQL, and a payload JSON cannot hold as its repr (logged)."""
        payload = _storable(row[8])
        text = self._json_or_none(payload)
        if self._postgresql and isinstance(payload, dict) and text and "\\u0000" in text:
            text = self._json_or_none(escape_nul(payload))
        if text is not None:
            return text
        # Keep the event (never drop it) with its payload as text, and say so.
        _log.error(
            "event payload is not JSON-serialisable; stored as its repr",
            store=self._shown_url,
            event_id=row[0],
            call_id=row[1],
            seq=row[2],
        )
        return _encode({"unserialisable_payload": repr(payload)[:4000]})

    @staticmethod
    def _json_or_none(value: Any) -> str | None:
        try:
            return _encode(value)
        except (TypeError, ValueError, RecursionError):
            pass
        try:
            return _encode(_finite(value))  # NaN and infinities have no JSON spelling
        except (TypeError, ValueError, RecursionError):
            return None

    def _encode_row(self, row: list[Any], payload: str) -> str:
        """One row by the json module, with its payload's JSON text."""
        try:
            envelope = _encode(_storable(row[:8]))
        except (TypeError, ValueError, RecursionError):
            envelope = _encode(_finite(_storable(row[:8])))  # NaN and infinities: no JSON spelling
        field = payload if self._postgresql else _encode(payload)
        return envelope[:-1] + "," + field + "]"

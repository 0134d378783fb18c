"""Checks shared by the reliability tests: complete event streams, and stored rows read back.

Invariants checked here (the event catalogue in pipeline/_events.py):
- a call's ``seq`` runs 0, 1, 2 ... with no gap and no duplicate;
- ``trace_created`` is first, and exactly one ``completed`` exists and is last.

Stored rows are read with the stdlib ``sqlite3`` module (or asyncpg), not through the store's own
reader, so that a bug in the reader cannot hide a bug in the writer.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmtrail.pipeline import Event


@dataclass(frozen=True, slots=True)
class Row:
    """One event as stored: the envelope plus the global position."""

    position: int
    event_id: str
    call_id: str
    seq: int
    type: str
    payload: dict[str, Any]


def by_call(events: Iterable[Event | Row]) -> dict[str, list[Any]]:
    calls: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        calls[event.call_id].append(event)
    for stream in calls.values():
        stream.sort(key=lambda e: e.seq)
    return dict(calls)


def stream_problems(call_id: str, stream: list[Any], *, complete: bool = True) -> list[str]:
    """What is wrong with one call's stream (empty when it is well formed)."""
    problems: list[str] = []
    seqs = [e.seq for e in stream]
    types = [str(e.type) for e in stream]
    if seqs != list(range(len(seqs))):
        problems.append(f"{call_id}: seq {seqs} is not 0..{len(seqs) - 1}")
    if not types or types[0] != "trace_created":
        problems.append(f"{call_id}: first event is {types[:1]}, not trace_created")
    done = types.count("completed")
    if complete and done != 1:
        problems.append(f"{call_id}: {done} completed events in {types}")
    if done > 1 or (done == 1 and types[-1] != "completed"):
        problems.append(f"{call_id}: completed is not the one last event: {types}")
    return problems


def assert_streams_complete(events: Iterable[Event | Row]) -> dict[str, list[Any]]:
    """Every call's stream is contiguous and ends with its one ``completed``; returns them."""
    calls = by_call(events)
    problems = [p for call_id, stream in calls.items() for p in stream_problems(call_id, stream)]
    assert not problems, f"{len(problems)} malformed streams, e.g. {problems[:5]}"
    return calls


def completed(stream: list[Any]) -> Mapping[str, Any]:
    last = stream[-1]
    assert str(last.type) == "completed", [str(e.type) for e in stream]
    payload: Mapping[str, Any] = last.payload
    return payload


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite+aiosqlite:///path`` URL."""
    return Path(url.split(":///", 1)[1])


def sqlite_rows(path: Path, table: str = "events") -> list[sqlite3.Row]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        connection.row_factory = sqlite3.Row
        return connection.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608
    finally:
        connection.close()


def _row(record: Mapping[str, Any]) -> Row:
    payload = record["payload"]
    if isinstance(payload, str | bytes):
        payload = json.loads(payload)
    return Row(
        int(record["position"]),
        str(record["event_id"]),
        str(record["call_id"]),
        int(record["seq"]),
        str(record["type"]),
        dict(payload or {}),
    )


def stored_events_sqlite(path: Path) -> list[Row]:
    return sorted((_row(dict(r)) for r in sqlite_rows(path)), key=lambda r: r.position)


async def stored_events_pg(url: str) -> list[Row]:
    import asyncpg

    parts = urlsplit(url.replace("postgresql+asyncpg", "postgresql", 1))
    connection = await asyncpg.connect(parts.geturl())
    try:
        records = await connection.fetch("SELECT * FROM events ORDER BY position")
    finally:
        await connection.close()
    return [_row(dict(r)) for r in records]


async def stored_events(url: str) -> list[Row]:
    if url.startswith("sqlite"):
        return stored_events_sqlite(sqlite_path(url))
    return await stored_events_pg(url)


def assert_store_equals_emitted(stored: list[Row], emitted: list[Event]) -> None:
    """The store holds exactly the emitted events: same ids, same (call_id, seq, type)."""
    assert len(stored) == len(emitted), f"{len(stored)} rows stored, {len(emitted)} emitted"
    duplicates = [k for k, n in Counter(r.event_id for r in stored).items() if n > 1]
    assert not duplicates, f"event_ids stored twice: {duplicates[:5]}"
    want = {e.event_id: (e.call_id, e.seq, str(e.type)) for e in emitted}
    got = {r.event_id: (r.call_id, r.seq, r.type) for r in stored}
    assert got == want


@contextlib.asynccontextmanager
async def store_locked(url: str) -> AsyncIterator[Any]:
    """Another connection holds the lock the writer needs (SQLite's write lock, PostgreSQL's
    ``events`` table with the server answering); yields a function true while it holds it."""
    if url.startswith("sqlite"):
        locker = sqlite3.connect(sqlite_path(url), timeout=30, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield lambda: locker.in_transaction
        finally:
            locker.rollback()
            locker.close()
        return
    import asyncpg

    connection = await asyncpg.connect(
        urlsplit(url.replace("postgresql+asyncpg", "postgresql", 1)).geturl()
    )
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    try:
        yield lambda: connection.is_in_transaction()
    finally:
        await transaction.rollback()
        await connection.close()

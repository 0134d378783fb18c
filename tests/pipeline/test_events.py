"""The typed event seam (pipeline/_events.py): one payload type per event type, shared by every
producer and consumer, and stored JSON unchanged from the layout before the types existed."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from llmtrail.pipeline import BaseLLMService, Event, EventType, GenerationRequest
from llmtrail.pipeline._events import PAYLOAD_TYPES, payload_of
from llmtrail.storage import EventStore, calls, create_engine, migrate, open_store_sink, rebuild
from tests.conftest import RecordingSink

ROOT = Path(__file__).resolve().parents[2]
# Rows written by the previous layout (top-level `pipeline`/`storage` packages, untyped dict
# payloads): three calls, one retried after a 429, one of an unpriced model.
PREVIOUS = Path(__file__).resolve().parents[1] / "storage" / "data" / "previous_layout_events.jsonl"


def _fields(kind: EventType) -> tuple[frozenset[str], frozenset[str]]:
    typed = PAYLOAD_TYPES[kind]
    required = frozenset(typed.__required_keys__)
    return required, required | frozenset(typed.__optional_keys__)


# Fields added after the previous layout wrote its rows: an old row lacks them, and every
# consumer reads them with .get (the rebuild below proves the folds do).
ADDED_SINCE_PREVIOUS_LAYOUT = frozenset(
    {
        "output_type",
        "previous_response_id",
        "resource",
        "service_tier",
        "stream",
        "api",
        "processing_s",
        "body_sent_s",
        "not_sent",
        "first_byte_s",
    }
)


def _check_shape(event: Event, *, missing_ok: frozenset[str] = frozenset()) -> None:
    required, allowed = _fields(event.type)
    keys = set(event.payload)
    assert required - missing_ok <= keys, f"{event.type} lacks {sorted(required - keys)}"
    assert keys <= allowed, f"{event.type} has fields its type lacks: {sorted(keys - allowed)}"


def test_every_event_type_has_exactly_one_payload_type() -> None:
    assert set(PAYLOAD_TYPES) == set(EventType)


async def test_a_real_call_emits_payloads_of_exactly_their_declared_shape(
    mock_server_factory: Any,
) -> None:
    server = await mock_server_factory(
        fault_script=("rate_limit_429", "none", "http_500", "http_500", "http_500")
    )
    recorder = RecordingSink()
    async with BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test",
        store_url=None,
        tracing=False,
        sinks=[recorder],
        max_rpm=600,
        max_tpm=100_000,
        retry_backoff_base_s=0.01,
        capture_content=True,
    ) as service:
        ok = await service.execute_generation_async(GenerationRequest(user_prompt="hi"), "op")
        bad = await service.execute_generation_async(GenerationRequest(user_prompt="hi"), "op")
    assert ok.success and ok.attempts == 2
    assert not bad.success
    kinds = {event.type for event in recorder.events}
    assert {EventType.RETRY_SCHEDULED, EventType.ATTEMPT_FAILED, EventType.RECEIVED} <= kinds
    for event in recorder.events:
        _check_shape(event)


def test_consumers_read_only_fields_some_payload_type_declares() -> None:
    """A field renamed or removed in _events.py and still read by a consumer fails here."""
    declared: set[str] = set()
    for kind in EventType:
        declared |= _fields(kind)[1]
    pattern = re.compile(
        r"payload(?:\.get\(|\[)\s*\"(\w+)\"|_(?:int|float|opt_float|opt_str)\(payload, \"(\w+)\""
    )
    read: dict[str, set[str]] = {}
    for folder in ("storage", "telemetry"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for match in pattern.finditer(path.read_text()):
                name = match.group(1) or match.group(2)
                read.setdefault(name, set()).add(path.name)
    assert read, "the pattern found no payload reads: it no longer matches the consumers"
    unknown = {name: sorted(files) for name, files in read.items() if name not in declared}
    assert not unknown, f"consumers read payload fields no event type declares: {unknown}"


def _previous_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PREVIOUS.read_text().splitlines()]


async def test_a_store_written_by_the_previous_layout_reads_unchanged(tmp_path: Path) -> None:
    rows = _previous_rows()
    old_url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await migrate(old_url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.executemany(
            "INSERT INTO events (event_id, call_id, seq, type, occurred_at, trace_id, span_id,"
            " instance, payload) VALUES (:event_id, :call_id, :seq, :type, :occurred_at,"
            " :trace_id, :span_id, :instance, :payload)",
            rows,
        )
    async with await EventStore.open(old_url) as store:
        stored = [s.event for s in await store.read(0, 1_000)]
    assert [e.event_id for e in stored] == [row["event_id"] for row in rows]
    for event in stored:
        _check_shape(event, missing_ok=ADDED_SINCE_PREVIOUS_LAYOUT)
    first = [e for e in stored if e.type is EventType.COMPLETED]
    assert [payload_of(e, EventType.COMPLETED)["attempts"] for e in first] == [2, 1, 1]

    engine = create_engine(old_url)
    try:
        await rebuild(engine)
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.select(calls.c.operation_name, calls.c.attempts, calls.c.cost_usd).order_by(
                    calls.c.started_at
                )
            )
            projected = [tuple(row) for row in result]
    finally:
        await engine.dispose()
    assert [(op, attempts) for op, attempts, _ in projected] == [
        ("greet", 2),
        ("summarize", 1),
        ("unpriced", 1),
    ]
    assert projected[0][2] is not None and projected[2][2] is None  # unpriced, never $0

    # Written again by today's writer, every payload is byte for byte the stored JSON.
    new_path = tmp_path / "new.db"
    writer = open_store_sink(f"sqlite+aiosqlite:///{new_path}")
    await writer.start()
    for event in stored:
        writer.emit(event)
    await writer.aclose()
    with sqlite3.connect(new_path) as db:
        rewritten = dict(db.execute("SELECT event_id, payload FROM events"))
    assert {row["event_id"]: row["payload"] for row in rows} == rewritten

"""Projection rebuild speed: replay a 1,000,000-event log into calls, usage_daily and
metrics_minute, on SQLite and on PostgreSQL.

Invariants:
- The log is written through the real EventWriter (not timed) and looks like production:
  about 8 events per call, one call in ten retried after a 429, one in twenty failed, every
  call with a tenant in its metadata.
- A figure is the full ``rebuild()`` of all three projections (wipe, read every event, fold,
  write every row, checkpoint), end to end, as events per second; the median of the
  repetitions. Target: >= 100,000 events/s on SQLite.
- PostgreSQL is measured when it is reachable (127.0.0.1:5432), else reported as SKIP.

Run alone: ``python -m benchmarks --only projections`` (``--quick``: 200,000 events).
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ._harness import pick
from ._report import Figure, Section, Target

TARGET_EVENTS_PER_S = 100_000
PG_ADMIN_DSN = os.environ.get("LLMTRAIL_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
OPERATIONS = ("answer", "summarise", "classify", "extract")


def synthetic_log(n_events: int, *, start: datetime | None = None) -> list[Any]:
    """At least ``n_events`` lifecycle events of complete calls, streams interleaved by 4."""
    from llmtrail.pipeline import Event, EventType

    t0 = start or datetime(2025, 1, 1, tzinfo=UTC)
    out: list[Any] = []
    call = 0
    while len(out) < n_events:
        group = [_call(call + k, t0, Event, EventType) for k in range(4)]
        call += 4
        # Interleave four concurrent calls, as a busy service does.
        for step in range(max(len(s) for s in group)):
            for stream in group:
                if step < len(stream):
                    out.append(stream[step])
    return out


def _call(i: int, t0: datetime, event: Any, kind: Any) -> list[Any]:
    call_id = f"{i:08x}{uuid.UUID(int=i).hex[:24]}"
    trace_id = uuid.UUID(int=i * 7919 + 1).hex
    at = t0 + timedelta(milliseconds=37 * i)
    model, operation = MODELS[i % len(MODELS)], OPERATIONS[i % len(OPERATIONS)]
    events: list[Any] = []

    def add(type_: Any, payload: dict[str, Any], dt: float = 0.001) -> None:
        nonlocal at
        at = at + timedelta(seconds=dt)
        events.append(
            event(call_id, len(events), type_, at, trace_id, trace_id[:16], payload, "bench:1")
        )

    add(
        kind.TRACE_CREATED,
        {
            "operation_name": operation,
            "model": model,
            "metadata": {"tenant": f"t{i % 50}"},
            "estimated_input_tokens": 400,
            "max_output_tokens": 256,
            "reserved_tokens": 656,
        },
    )
    add(
        kind.GATE_WAIT,
        {"gate": "tpm", "attempt": 1, "amount": 656, "waited_s": 0.0, "waiters_ahead": 0},
    )
    add(kind.SEMAPHORE_ACQUIRED, {"waited_s": 0.002, "in_flight": 12, "waiters_ahead": 0})
    attempts = 2 if i % 10 == 0 else 1
    failed = i % 20 == 7
    for attempt in range(1, attempts + 1):
        add(
            kind.GATE_WAIT,
            {
                "gate": "rpm",
                "attempt": attempt,
                "amount": 1,
                "waited_s": 0.5 * (attempt - 1),
                "waiters_ahead": attempt - 1,
            },
        )
        add(kind.SENT, {"attempt": attempt})
        if attempt < attempts:
            add(
                kind.ATTEMPT_FAILED,
                {
                    "attempt": attempt,
                    "latency_s": 0.05,
                    "error_type": "rate_limited",
                    "status": 429,
                    "retryable": True,
                    "retry_after_s": 0.5,
                },
                0.05,
            )
            add(
                kind.RETRY_SCHEDULED,
                {
                    "attempt": attempt,
                    "next_attempt": attempt + 1,
                    "wait_s": 0.5,
                    "reason": "rate_limited",
                },
            )
        elif failed:
            add(
                kind.ATTEMPT_FAILED,
                {
                    "attempt": attempt,
                    "latency_s": 0.2,
                    "error_type": "bad_request",
                    "status": 400,
                    "retryable": False,
                },
                0.2,
            )
        else:
            add(
                kind.RECEIVED,
                {
                    "attempt": attempt,
                    "latency_s": 0.8,
                    "status": 200,
                    "input_tokens": 380 + i % 40,
                    "cached_tokens": 128 * (i % 2),
                    "output_tokens": 120 + i % 90,
                    "reasoning_tokens": 0,
                    "total_tokens": 500 + i % 40 + i % 90,
                },
                0.8,
            )
    add(
        kind.COMPLETED,
        {
            "outcome": "failed" if failed else "succeeded",
            "error_type": "bad_request" if failed else None,
            "attempts": attempts,
            "total_s": 1.0,
        },
    )
    return events


async def _populate(url: str, log: list[Any]) -> None:
    from llmtrail.storage import open_store_sink

    writer = open_store_sink(url, max_queue=50_000)
    await writer.start()
    try:
        for item in log:
            while not writer.emit(item):
                await writer.wait_for_room()
        await writer.flush()
    finally:
        await writer.aclose()


async def _rebuild_rate(url: str, events: int) -> float:
    from llmtrail.storage._engine import create_engine
    from llmtrail.storage._projections import rebuild

    engine = create_engine(url)
    try:
        started = time.perf_counter()
        applied = await rebuild(engine)
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    assert applied["calls"] == events, applied
    return events / elapsed


def _pg_database() -> tuple[str, str] | None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return None
    name = f"llmtrail_bench_{uuid.uuid4().hex[:10]}"
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def _pg_admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _main(quick: bool) -> dict[str, Any]:
    n = pick(quick, 1_000_000, 200_000, 5_000)
    reps = pick(quick, 3, 2, 1)
    section = Section("projections", "Projection rebuild")
    target = Target(">=", TARGET_EVENTS_PER_S, label=f">= {TARGET_EVENTS_PER_S:,} events/s")
    pg = _pg_database()
    with tempfile.TemporaryDirectory(prefix="llmtrail-bench-") as tmp:
        stores = {"SQLite": f"sqlite+aiosqlite:///{Path(tmp) / 'projections.db'}"}
        if pg is not None:
            await _pg_admin(f'CREATE DATABASE "{pg[0]}"')
            stores["PostgreSQL"] = pg[1]
        try:
            log = synthetic_log(n)
            events = len(log)
            calls = len({e.call_id for e in log})
            for url in stores.values():
                await _populate(url, log)
            # The log must not stay on the heap: a million live events would make every
            # garbage collection during the rebuild scan them, which a real rebuild (a fresh
            # `llmtrail projections rebuild` process) never pays.
            del log
            gc.collect()
            section.notes.append(
                f"{events:,} events ({calls:,} calls, ~{events / calls:.1f} events per call) "
                "written through the EventWriter, then rebuild() of calls, usage_daily and "
                f"metrics_minute, {reps} repetitions (median)."
            )
            for backend, url in stores.items():
                rates = [await _rebuild_rate(url, events) for _ in range(reps)]
                section.add(
                    Figure(
                        f"rebuild, {backend}",
                        "events/s",
                        rates,
                        target=target if backend == "SQLite" else None,
                    )
                )
        finally:
            if pg is not None:
                await _pg_admin(f'DROP DATABASE IF EXISTS "{pg[0]}" WITH (FORCE)')
    if pg is None:
        section.add(
            Figure(
                "rebuild, PostgreSQL",
                "events/s",
                [],
                error="skip: PostgreSQL not reachable at 127.0.0.1:5432",
            )
        )
    return section.to_dict()


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(main("--quick" in sys.argv), indent=2, default=str))

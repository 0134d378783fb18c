"""Event writer append throughput and event-loop lag, on SQLite and PostgreSQL.

``python -m benchmarks.bench_store_writer [--events N] [--backend sqlite|postgresql|both]``,
or ``main(quick)`` from the harness (same section format as the other benches).

What is measured: a producer emits realistic lifecycle events (8 per call, 200 calls in
flight, the pipeline's random 128-bit call and event ids, payloads shaped like the real ones)
as fast as the writer's backpressure lets it (``emit() -> False`` -> ``await wait_for_room()``),
yielding to the loop every 64 events as concurrent calls would,
into a fresh, migrated store. Events/s = events / (first emit .. ``flush()`` returned). The loop
lag (harness ``LagProbe``: a 1 ms ticker's lateness) is taken over the same window.

Invariants:
- The store is created and migrated before the stopwatch starts; the window ends only when
  every event is committed (``flush()``), so nothing is deferred past it.
- Events are built before the window: producing them is the pipeline's cost, not the writer's.
- PostgreSQL gets a fresh database (dropped afterwards); it is skipped when unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llmtrail.pipeline import Event, EventType

from ._harness import LagProbe, pick
from ._report import Figure, Section, Target

PG_ADMIN_DSN = os.environ.get("LLMTRAIL_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_PER_TURN = 64
TARGETS = {"sqlite": 50_000.0, "postgresql": 30_000.0}
_TYPES = (
    EventType.TRACE_CREATED,
    EventType.GATE_WAIT,
    EventType.GATE_WAIT,
    EventType.SEMAPHORE_ACQUIRED,
    EventType.SENT,
    EventType.RECEIVED,
    EventType.UNMARKED,
    EventType.COMPLETED,
)


def _payload(kind: EventType, seq: int) -> dict[str, Any]:
    if kind is EventType.TRACE_CREATED:
        return {
            "operation_name": "summarise",
            "model": "gpt-4o-mini",
            "request_id": None,
            "metadata": {"tenant": "acme", "job": "nightly"},
            "estimated_input_tokens": 412,
            "max_output_tokens": 256,
            "reserved_tokens": 668,
            "rpm_at_start": 120,
            "tpm_at_start": 80_000,
            "parent_span_id": None,
            "temperature": 0.2,
            "reasoning_effort": None,
            "server_address": "127.0.0.1",
            "server_port": 8000,
            "capture_content": False,
        }
    if kind is EventType.GATE_WAIT:
        return {
            "gate": "rpm" if seq == 1 else "tpm",
            "attempt": 1,
            "amount": 1 if seq == 1 else 668,
            "waited_s": 0.0,
            "waiters_ahead": 0,
        }
    if kind is EventType.SEMAPHORE_ACQUIRED:
        return {"waited_s": 0.0012, "in_flight": 37, "waiters_ahead": 0}
    if kind is EventType.SENT:
        return {"attempt": 1}
    if kind is EventType.RECEIVED:
        return {
            "attempt": 1,
            "latency_s": 0.231,
            "status": 200,
            "response_id": "resp_" + "0" * 24,
            "response_model": "gpt-4o-mini-2024-07-18",
            "finish_reasons": ["stop"],
            "input_tokens": 409,
            "cached_tokens": 0,
            "output_tokens": 118,
            "reasoning_tokens": 0,
            "total_tokens": 527,
            "cost_usd": "0.00013215",
            "provider_request_id": "req_" + "0" * 24,
            "rate_limits": {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "499",
                "x-ratelimit-limit-tokens": "200000",
                "x-ratelimit-remaining-tokens": "199332",
            },
        }
    if kind is EventType.UNMARKED:
        return {"gate": "tpm", "attempt": 1, "amount": 141, "reason": "reconciled"}
    return {
        "outcome": "succeeded",
        "error_type": None,
        "error_message": None,
        "attempts": 1,
        "input_tokens": 409,
        "cached_tokens": 0,
        "output_tokens": 118,
        "reasoning_tokens": 0,
        "total_tokens": 527,
        "cost_usd": "0.00013215",
        "model": "gpt-4o-mini-2024-07-18",
        "response_id": "resp_" + "0" * 24,
        "rpm_wait_s": 0.0,
        "tpm_wait_s": 0.0,
        "semaphore_wait_s": 0.0012,
        "latency_s": 0.231,
        "total_s": 0.2342,
    }


def _ordered_id() -> str:
    """A time-ordered 128-bit id (48-bit milliseconds, then 80 random bits), as hex."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def make_events(
    count: int, *, in_flight: int = 200, seed: int = 7, ordered_ids: bool = False
) -> list[Event]:
    """``count`` events of whole or partial calls, interleaved like concurrent calls.

    ``ordered_ids`` draws call and event ids that grow with time instead of random ones.
    """
    rng = random.Random(seed)
    new_id = _ordered_id if ordered_ids else lambda: os.urandom(16).hex()
    start = datetime.now(UTC)
    calls: list[list[Any]] = []
    out: list[Event] = []
    while len(out) < count:
        while len(calls) < in_flight:
            calls.append([new_id(), os.urandom(16).hex(), os.urandom(8).hex(), 0])
        index = rng.randrange(len(calls))
        call = calls[index]
        seq = call[3]
        kind = _TYPES[seq]
        out.append(
            Event(
                call_id=call[0],
                seq=seq,
                type=kind,
                occurred_at=start + timedelta(microseconds=len(out)),
                trace_id=call[1],
                span_id=call[2],
                payload=_payload(kind, seq),
                event_id=new_id(),
            )
        )
        call[3] += 1
        if call[3] == len(_TYPES):
            calls.pop(index)
    return out


async def _pg_database(action: str, name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        if action == "create":
            await connection.execute(f'CREATE DATABASE "{name}"')
        else:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def measure(
    url: str, count: int, *, batch_size: int = 5_000, ordered_ids: bool = False
) -> dict[str, float]:
    """One run: events/s and loop lag appending ``count`` events to a fresh store at ``url``."""
    from llmtrail.storage import open_store_sink

    batch = make_events(count, ordered_ids=ordered_ids)
    writer = open_store_sink(url, batch_size=batch_size)
    await writer.start()  # migrates the fresh store outside the timed window
    try:
        async with LagProbe() as lag:
            began = time.perf_counter()
            cpu_began = time.process_time()
            for index, event in enumerate(batch):
                if not writer.emit(event):
                    await writer.wait_for_room()
                elif index % _PER_TURN == 0:
                    # A real producer (calls in flight) yields to the loop between events;
                    # without this the producer itself, not the writer, would show as lag.
                    await asyncio.sleep(0)
            await writer.flush()
            elapsed = time.perf_counter() - began
            cpu = time.process_time() - cpu_began
        assert writer.written == count, (writer.written, count)
        return {
            "events_per_s": count / elapsed,
            "cpu_per_event_us": cpu / count * 1e6,
            **lag.summary_ms(),
        }
    finally:
        await writer.aclose()


async def _run_backend(
    backend: str, count: int, reps: int, batch_size: int = 5_000, ordered_ids: bool = False
) -> list[dict[str, float]]:
    runs: list[dict[str, float]] = []
    for _ in range(reps):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite+aiosqlite:///{Path(tmp) / 'b.db'}"
                runs.append(
                    await measure(url, count, batch_size=batch_size, ordered_ids=ordered_ids)
                )
        else:
            name = f"llmtrail_bench_{uuid.uuid4().hex[:10]}"
            await _pg_database("create", name)
            try:
                runs.append(
                    await measure(
                        f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}",
                        count,
                        batch_size=batch_size,
                        ordered_ids=ordered_ids,
                    )
                )
            finally:
                await _pg_database("drop", name)
    return runs


async def idle_lag(seconds: float = 2.0) -> dict[str, float]:
    """The loop lag of an idle loop on this machine right now: the floor for the figures above."""
    async with LagProbe() as lag:
        await asyncio.sleep(seconds)
    return lag.summary_ms()


def _pg_reachable() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return True
    except OSError:
        return False


def main(quick: bool = False) -> dict[str, Any]:
    count = pick(quick, full=200_000, short=50_000, smoke=5_000)
    reps = 3
    section = Section(key="store_writer", title="Event writer append throughput")
    for backend in ("sqlite", "postgresql"):
        if backend == "postgresql" and not _pg_reachable():
            section.add(
                Figure(
                    f"{backend} append",
                    "events/s",
                    [],
                    error="PostgreSQL is not reachable at 127.0.0.1:5432",
                )
            )
            continue
        runs = asyncio.run(_run_backend(backend, count, reps))
        section.add(
            Figure(
                f"{backend} append ({count:,} events)",
                "events/s",
                [r["events_per_s"] for r in runs],
                target=Target(">=", TARGETS[backend]),
            )
        )
        section.add(Figure(f"{backend} loop lag p99", "ms", [r["lag_p99_ms"] for r in runs]))
        section.add(Figure(f"{backend} loop lag max", "ms", [r["lag_max_ms"] for r in runs]))
    floor = asyncio.run(idle_lag())
    section.add(Figure("idle loop lag p99 (machine floor)", "ms", [floor["lag_p99_ms"]]))
    section.notes.append(
        "Random 128-bit call and event ids, as the pipeline draws them; 200 calls in flight."
    )
    return section.to_dict()


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_store_writer")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument(
        "--ordered-ids", action="store_true", help="time-ordered call/event ids instead of random"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    floor = asyncio.run(idle_lag())
    print(f"idle loop lag now: p99 {floor['lag_p99_ms']:.1f} ms, max {floor['lag_max_ms']:.1f} ms")
    for backend in backends:
        runs = asyncio.run(
            _run_backend(backend, args.events, args.reps, args.batch_size, args.ordered_ids)
        )
        for key in runs[0]:
            values = [r[key] for r in runs]
            print(
                f"{backend:10} {key:18} median {statistics.median(values):12,.1f}  "
                f"runs {', '.join(f'{v:,.1f}' for v in values)}"
            )


if __name__ == "__main__":
    _cli()

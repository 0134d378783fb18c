"""Event store: writer append throughput, projection rebuild throughput, loop lag under load.

- Append: the real :class:`storage.EventWriter` (``open_store_sink``) is fed as fast as it
  accepts (``emit``, and ``wait_for_room`` when it pushes back) until ``flush()`` returns:
  events/s committed. Baseline: the same rows through a plain SQLAlchemy Core executemany,
  2,000 rows per transaction (what a straightforward implementation would do).
- Lag: a 1 ms ticker on the same loop during each append run, against an idle loop's ticker
  measured in the same round. The producer yields to the loop every 64 events, as concurrent
  calls would, so the lag is the writer's, not the producer's.
- Rebuild: ``storage._projections.rebuild`` of every projection over a store holding 1,000,000
  events (100,000 with --quick), on SQLite and on PostgreSQL.

Invariants:
- The events are real: the streams of a few dozen calls recorded from the pipeline against
  the local server, cloned with fresh call, event, trace and span ids and shifted times, so
  payload shapes and sizes are exactly what the pipeline writes.
- SQLite gets a fresh file per append run; PostgreSQL gets one fresh database for the whole
  bench (``CREATE DATABASE`` on the server at 127.0.0.1:5432, dropped at the end), truncated
  between append runs. When PostgreSQL is unreachable its figures are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from ._harness import API_KEY, MODEL, LagProbe, column, pick, prompt, run_interleaved
from ._report import Figure, Section, Target, median, paired_ratios

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_DSN = os.environ.get("LLMTRAIL_PG_ADMIN_DSN", f"postgresql://postgres@{PG_HOST}:{PG_PORT}")
RAW_BATCH = 2_000
FILL_BASE = 20_000
YIELD_EVERY = 64  # events emitted between two yields to the loop, as by concurrent calls


# ---------------------------------------------------------------- events


async def record_templates(calls: int = 40) -> list[list[Any]]:
    """The event streams of ``calls`` real pipeline calls (gates on, so every type appears)."""
    from llmtrail.pipeline import BaseLLMService, Event, GenerationRequest
    from llmtrail.testing import MockServer, MockServerConfig, RecordingSink

    recorder = RecordingSink()
    # Three failed first attempts, so retries are part of the streams too.
    faults = MockServerConfig(fault_script=("http_500", "rate_limit_429", "http_503"))
    async with MockServer(faults) as server:
        service = BaseLLMService(
            model=MODEL,
            base_url=f"{server.url}/v1",
            api_key=API_KEY,
            max_rpm=1_000_000,
            max_tpm=100_000_000,  # below the server's own limit: its headers never bind
            store_url=None,
            tracing=False,
            sinks=[recorder],
            retry_backoff_base_s=0.001,
            retry_backoff_max_s=0.001,
        )
        async with service:
            await asyncio.gather(
                *(
                    service.execute_generation_async(
                        GenerationRequest(
                            user_prompt=prompt(i), max_output_tokens=64, metadata={"tenant": "t1"}
                        ),
                        operation_name="bench",
                    )
                    for i in range(calls)
                )
            )
    streams: dict[str, list[Event]] = {}
    for event in recorder.events:
        streams.setdefault(event.call_id, []).append(event)
    return list(streams.values())


def synth_events(templates: list[list[Any]], n: int) -> Iterator[Any]:
    """``n`` events: the template streams cloned with new ids, 10 ms apart per call.

    Payload dicts are shared between clones (events are read-only): the point is the
    writer's cost, not the generator's memory.
    """
    made = 0
    k = 0
    while made < n:
        stream = templates[k % len(templates)]
        shift = timedelta(milliseconds=10 * k)
        call_id = uuid.uuid4().hex
        trace_id = uuid.uuid4().hex
        span_id = trace_id[:16]
        for event in stream:
            if made == n:
                return
            yield dataclasses.replace(
                event,
                call_id=call_id,
                trace_id=trace_id,
                span_id=span_id,
                occurred_at=event.occurred_at + shift,
                event_id=os.urandom(16).hex(),
            )
            made += 1
        k += 1


# ---------------------------------------------------------------- PostgreSQL database


def pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for this bench; dropped afterwards."""
    import asyncpg  # type: ignore[import-untyped]

    name = f"llmtrail_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{PG_ADMIN_DSN}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await asyncpg.connect(f"{PG_ADMIN_DSN}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ---------------------------------------------------------------- runs


async def _append_writer(url: str, events: list[Any]) -> dict[str, float]:
    from llmtrail.storage import open_store_sink

    writer = open_store_sink(url, instance="bench:1")
    await writer.start()  # opens the engine and migrates; not timed
    try:
        async with LagProbe() as probe:
            started = time.perf_counter()
            for i, event in enumerate(events):
                if not writer.emit(event):
                    await writer.wait_for_room()
                elif i % YIELD_EVERY == 0:
                    # Calls emit a few events and then await; a producer that never yields
                    # would show its own loop time as the writer's lag.
                    await asyncio.sleep(0)
            await writer.flush()
            elapsed = time.perf_counter() - started
    finally:
        await writer.aclose()
    return {"events_per_s": len(events) / elapsed, **probe.summary_ms()}


async def _append_raw(url: str, events: list[Any]) -> dict[str, float]:
    """Baseline: SQLAlchemy Core executemany, RAW_BATCH rows per transaction."""
    from llmtrail.storage import create_engine, ensure_schema
    from llmtrail.storage import events as table

    engine = create_engine(url)
    try:
        await ensure_schema(engine)
        rows = [
            {
                "event_id": e.event_id,
                "call_id": e.call_id,
                "seq": e.seq,
                "type": str(e.type),
                "occurred_at": e.occurred_at,
                "trace_id": e.trace_id,
                "span_id": e.span_id,
                "instance": e.instance,
                "payload": e.payload,
            }
            for e in events
        ]
        started = time.perf_counter()
        for i in range(0, len(rows), RAW_BATCH):
            async with engine.begin() as conn:
                await conn.execute(table.insert(), rows[i : i + RAW_BATCH])
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    return {"events_per_s": len(events) / elapsed}


async def _truncate(url: str) -> None:
    from sqlalchemy import text

    from llmtrail.storage import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("TRUNCATE events"))
    finally:
        await engine.dispose()


async def _idle_lag(seconds: float) -> dict[str, float]:
    async with LagProbe() as probe:
        await asyncio.sleep(seconds)
    return probe.summary_ms()


async def _populate(url: str, templates: list[list[Any]], n: int) -> float:
    """Fill a store with ``n`` events; returns events/s.

    Up to ``FILL_BASE`` events go through the writer (the real path); the rest are copies of
    those rows made by the database itself (``INSERT ... SELECT`` with suffixed ids), which
    spares the bench minutes of Python-side event generation before a rebuild.
    """
    from sqlalchemy import func, select, text

    from llmtrail.storage import create_engine, open_store_sink
    from llmtrail.storage import events as table

    base = min(n, FILL_BASE)
    started = time.perf_counter()
    writer = open_store_sink(url, instance="bench:1")
    await writer.start()
    try:
        for event in synth_events(templates, base):
            if not writer.emit(event):
                await writer.wait_for_room()
        await writer.flush()
    finally:
        await writer.aclose()
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            last = int(await conn.scalar(select(func.max(table.c.position))) or 0)
        copy = 0
        made = base
        while made < n:
            copy += 1
            take = min(base, n - made)
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO events (event_id, call_id, seq, type, occurred_at, "
                        "trace_id, span_id, instance, payload) "
                        "SELECT event_id || :suffix, call_id || :suffix, seq, type, "
                        "occurred_at, trace_id, span_id, instance, payload FROM events "
                        "WHERE position <= :last ORDER BY position LIMIT :take"
                    ),
                    {"suffix": f"-{copy}", "last": last, "take": take},
                )
            made += take
    finally:
        await engine.dispose()
    return n / (time.perf_counter() - started)


async def _rebuild(url: str, n: int) -> dict[str, float]:
    from llmtrail.storage import create_engine
    from llmtrail.storage._projections import rebuild

    engine = create_engine(url)
    try:
        started = time.perf_counter()
        applied = await rebuild(engine)
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    # Every projection reads every event once; the figure is log events per second.
    seen = max(applied.values()) if applied else 0
    return {"events_per_s": n / elapsed, "applied": float(seen)}


# ---------------------------------------------------------------- main


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 5, 3, 2)
    n_append = pick(quick, 50_000, 10_000, 2_000)
    n_rebuild = pick(quick, 1_000_000, 100_000, 5_000)
    section = Section("store", "3. Event store and projections")
    section.notes.append(
        f"append: {n_append:,} events per run (real pipeline streams, cloned), {reps} rounds; "
        f"rebuild: every projection over {n_rebuild:,} events, up to {reps} rounds (3 when a "
        "round is slow; the reps column says how many ran)."
    )
    if n_rebuild != 1_000_000:
        section.notes.append(f"reduced run: rebuild over {n_rebuild:,} events, not 1,000,000")
    templates = await record_templates()
    per_call = sum(len(s) for s in templates) / len(templates)
    section.notes.append(f"{per_call:.1f} events per recorded call on average")
    events = list(synth_events(templates, n_append))
    use_pg = pg_reachable()
    if not use_pg:
        section.notes.append(
            f"PostgreSQL figures skipped: no server reachable at {PG_HOST}:{PG_PORT}"
        )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmtrail-store-")))
        pg = await stack.enter_async_context(fresh_pg_database()) if use_pg else None
        runs = 0

        def sqlite_url() -> str:
            nonlocal runs
            runs += 1
            return f"sqlite+aiosqlite:///{tmp / f'append-{runs}.db'}"

        async def pg_writer() -> dict[str, float]:
            assert pg is not None
            await _truncate(pg)
            return await _append_writer(pg, events)

        async def pg_raw() -> dict[str, float]:
            assert pg is not None
            await _truncate(pg)
            return await _append_raw(pg, events)

        variants: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
            ("idle", lambda: _idle_lag(1.0)),
            ("sqlite writer", lambda: _append_writer(sqlite_url(), events)),
            ("sqlite raw", lambda: _append_raw(sqlite_url(), events)),
        ]
        if pg is not None:
            # Migrate once before the rounds so the first round's runs are like the others.
            await _truncate_after_migrate(pg)
            variants += [("pg writer", pg_writer), ("pg raw", pg_raw)]
        append = await run_interleaved(variants, reps)
        if pg is not None:
            await _truncate(pg)

        rebuild_db = f"sqlite+aiosqlite:///{tmp / 'rebuild.db'}"
        fill = {"sqlite": await _populate(rebuild_db, templates, n_rebuild)}
        rebuild_variants: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
            ("sqlite", lambda: _rebuild(rebuild_db, n_rebuild))
        ]
        if pg is not None:
            fill["pg"] = await _populate(pg, templates, n_rebuild)
            rebuild_variants.append(("pg", lambda: _rebuild(pg, n_rebuild)))
        rebuilt = await run_interleaved(
            rebuild_variants, reps, budget_s=60 if quick else 240, min_reps=min(reps, 3)
        )

    sqlite_rate = column(append["sqlite writer"], "events_per_s")
    sqlite_raw = column(append["sqlite raw"], "events_per_s")
    section.add(
        Figure(
            "SQLite: writer append",
            "events/s",
            sqlite_rate,
            baseline="plain executemany",
            ratio_samples=paired_ratios(sqlite_rate, sqlite_raw),
            target=Target(">=", 50_000, label=">= 50,000"),
        )
    )
    section.add(Figure("SQLite: plain executemany (baseline)", "events/s", sqlite_raw))
    if pg is not None:
        pg_rate = column(append["pg writer"], "events_per_s")
        pg_raw_rate = column(append["pg raw"], "events_per_s")
        section.add(
            Figure(
                "PostgreSQL: writer append",
                "events/s",
                pg_rate,
                baseline="plain executemany",
                ratio_samples=paired_ratios(pg_rate, pg_raw_rate),
                target=Target(">=", 30_000, label=">= 30,000"),
            )
        )
        section.add(Figure("PostgreSQL: plain executemany (baseline)", "events/s", pg_raw_rate))
    else:
        section.add(
            Figure("PostgreSQL: writer append", "events/s", [], error="skipped: unreachable")
        )
    idle = append["idle"]
    for name in ("sqlite writer", "pg writer"):
        if name not in append:
            continue
        label = "SQLite" if name.startswith("sqlite") else "PostgreSQL"
        for metric, q in (("lag_p50_ms", "p50"), ("lag_p99_ms", "p99"), ("lag_max_ms", "max")):
            mine, base = column(append[name], metric), column(idle, metric)
            section.add(
                Figure(
                    f"{label}: event-loop lag {q} while appending",
                    "ms",
                    mine,
                    baseline="idle loop",
                    ratio_samples=paired_ratios(mine, base),
                    note=f"idle loop: {median(base):.3f} ms" if q != "max" else "",
                )
            )
    rates = column(rebuilt["sqlite"], "events_per_s")
    section.add(
        Figure(
            f"SQLite: projection rebuild ({n_rebuild:,} events)",
            "events/s",
            rates,
            target=Target(">=", 100_000, label=">= 100,000"),
            note=f"store filled at {fill['sqlite']:,.0f} events/s (see _populate)",
        )
    )
    if "pg" in rebuilt:
        pg_rates = column(rebuilt["pg"], "events_per_s")
        section.add(
            Figure(
                f"PostgreSQL: projection rebuild ({n_rebuild:,} events)",
                "events/s",
                pg_rates,
                baseline="SQLite",
                ratio_samples=paired_ratios(pg_rates, rates),
                note=f"store filled at {fill['pg']:,.0f} events/s (see _populate)",
            )
        )
    else:
        section.add(
            Figure("PostgreSQL: projection rebuild", "events/s", [], error="skipped: unreachable")
        )
    return section.to_dict()


async def _truncate_after_migrate(url: str) -> None:
    from llmtrail.storage import create_engine, ensure_schema

    engine = create_engine(url)
    try:
        await ensure_schema(engine)
    finally:
        await engine.dispose()
    await _truncate(url)

"""Scale: 10,000 concurrent calls, SQLite store on: peak RSS, event-loop lag, completeness.

Each repetition runs in a fresh child process that does only this, so its peak RSS
(``ru_maxrss``, the kernel's high-water mark) belongs to the calls and nothing else. The
zero-latency server runs in yet another process. The baseline is the bare SDK doing the same
10,000 calls (``asyncio.Semaphore(100)``, the pipeline's default concurrency) in its own
fresh child, interleaved with the pipeline's.

The pipeline runs twice per round: on the caller's loop (the default) and with
``own_loop=True`` (calls on the service's loop thread, awaited from the caller's loop). The lag
target is the application's loop: on the caller's loop every ready callback of 100 in-flight
calls runs before the ticker's, so the lag there is about concurrency x CPU per call (the bare
SDK shows the same); ``own_loop`` is the configuration that keeps the application's loop free.

Invariants:
- All calls are submitted at once (``asyncio.gather``): 10,000 pending calls, 100 in flight.
  One untimed warm-up call goes first, so the SDK's lazy imports on the first request are
  not counted as lag of the 10,000.
- Lag is the lateness of a 1 ms ticker on the caller's loop for the whole run.
- Completeness is read back from the store after the service closed: the number of distinct
  calls with a ``completed`` event must equal the number of calls.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import resource
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._harness import (
    API_KEY,
    MODEL,
    LagProbe,
    column,
    mock_server,
    pick,
    prompt,
    run_interleaved,
    server_reset,
)
from ._report import Figure, Section, Target, median, paired_ratios
from .bench_overhead import store_available

CONCURRENCY = 100
MAX_OUTPUT_TOKENS = 64
PIPELINE = "pipeline + SQLite store"
OWN = "pipeline + SQLite store, own_loop=True"
BARE = "bare SDK"


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _run(url: str, n: int, variant: str, db: str | None) -> dict[str, float]:
    import psutil  # type: ignore[import-untyped, unused-ignore]

    start_rss = psutil.Process().memory_info().rss / 2**20
    ok: list[bool]
    if variant == BARE:
        import openai

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def call(i: int) -> bool:
            async with semaphore:
                try:
                    await client.responses.create(
                        model=MODEL, input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS
                    )
                except openai.APIError:
                    return False
                return True

        await call(n)  # warm-up: the SDK's lazy imports and the first connection
        started = time.perf_counter()
        async with LagProbe() as probe:
            ok = await asyncio.gather(*(call(i) for i in range(n)))
        await client.close()
    else:
        from llmtrail.pipeline import BaseLLMService, GenerationRequest

        service = BaseLLMService(
            model=MODEL,
            base_url=f"{url}/v1",
            api_key=API_KEY,
            max_rpm=None,
            max_tpm=None,
            max_concurrent_requests=CONCURRENCY,
            store_url=f"sqlite+aiosqlite:///{db}" if db else None,
            tracing=False,
            max_attempts=1,
            own_loop=variant == OWN,
        )

        def request(i: int) -> GenerationRequest:
            return GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS)

        await service.start()
        # Warm-up: the SDK's lazy imports, the first connection, the store's schema.
        await service.execute_generation_async(request(n), operation_name="warm-up")
        started = time.perf_counter()
        async with LagProbe() as probe:
            async with service:
                results = await asyncio.gather(
                    *(
                        service.execute_generation_async(request(i), operation_name="bench")
                        for i in range(n)
                    )
                )
            ok = [r.success for r in results]
    elapsed = time.perf_counter() - started
    figures = {
        "peak_rss_mb": _peak_rss_mb(),
        "start_rss_mb": start_rss,
        "calls_per_s": n / elapsed,
        "succeeded": float(sum(ok)),
        **probe.summary_ms(),
    }
    if db is not None and variant != BARE:
        with sqlite3.connect(db) as conn:
            (complete,) = conn.execute(
                "SELECT COUNT(DISTINCT call_id) FROM events"
                " WHERE type = 'completed' AND call_id NOT IN"
                " (SELECT call_id FROM events WHERE type = 'trace_created'"
                "  AND json_extract(payload, '$.operation_name') = 'warm-up')"
            ).fetchone()
            (events,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
        figures["completed_calls"] = float(complete)
        figures["events"] = float(events)
    return figures


def _child(
    conn: multiprocessing.connection.Connection, url: str, n: int, variant: str, db: str | None
) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        conn.send(asyncio.run(_run(url, n, variant, db)))
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        conn.close()


def run_in_child(url: str, n: int, variant: str, db: str | None) -> dict[str, float]:
    """One repetition in a fresh process that runs only this."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, url, n, variant, db))
    proc.start()
    child.close()
    try:
        if not parent.poll(600):
            raise RuntimeError(f"{variant}: no result within 600 s")
        result: dict[str, Any] = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if "error" in result:
        raise RuntimeError(f"{variant} failed in its child process: {result['error']}")
    return result


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 3, 3, 1)
    n = pick(quick, 10_000, 500, 200)
    section = Section("scale", "5. Scale: 10,000 concurrent calls")
    section.notes.append(
        f"{n:,} calls submitted at once, {CONCURRENCY} in flight, zero-latency server in its "
        f"own process, each repetition in a fresh child process; {reps} rounds (each round "
        "is long; 3 rounds keep the full run within minutes)."
    )
    if n != 10_000:
        section.notes.append(f"reduced run: {n:,} calls instead of 10,000 (run without --quick)")
    no_store = store_available()
    if no_store is not None:
        section.notes.append(f"the pipeline ran without a store: {no_store}")
    with tempfile.TemporaryDirectory(prefix="llmtrail-scale-") as tmp, mock_server() as (url, _):
        runs = 0

        def repetition(variant: str) -> Callable[[], Awaitable[dict[str, float]]]:
            async def run() -> dict[str, float]:
                nonlocal runs
                runs += 1
                db = None
                if variant != BARE and no_store is None:
                    db = str(Path(tmp) / f"scale-{runs}.db")
                await server_reset(url)
                return await asyncio.to_thread(run_in_child, url, n, variant, db)

            return run

        results = await run_interleaved([(v, repetition(v)) for v in (PIPELINE, OWN, BARE)], reps)

    base = results[BARE]
    base_rss = column(base, "peak_rss_mb")
    base_lag = column(base, "lag_p99_ms")
    for variant in (OWN, PIPELINE):
        _pipeline_figures(section, variant, results[variant], base, n, no_store)
    section.add(Figure(f"{BARE}: peak RSS", "MB", base_rss))
    section.add(
        Figure(
            f"{BARE}: event-loop lag p99",
            "ms",
            base_lag,
            note=f"max {median(column(base, 'lag_max_ms')):.0f} ms",
        )
    )
    section.add(
        Figure(
            f"{BARE}: throughput",
            "calls/s",
            column(base, "calls_per_s"),
            note=f"{median(column(base, 'succeeded')):,.0f} of {n:,} calls succeeded",
        )
    )
    return section.to_dict()


def _pipeline_figures(
    section: Section,
    name: str,
    mine: list[dict[str, float]],
    base: list[dict[str, float]],
    n: int,
    no_store: str | None,
) -> None:
    """RSS, lag, completeness and throughput of one pipeline variant (targets on both)."""
    rss, base_rss = column(mine, "peak_rss_mb"), column(base, "peak_rss_mb")
    # The target is the application's loop staying free, which is what own_loop is for; on
    # the caller's loop the figure is reported beside the bare SDK's (see the module doc).
    lag_target = Target("<", 50, label="< 50 ms") if name == OWN else None
    section.add(
        Figure(
            f"{name}: peak RSS",
            "MB",
            rss,
            baseline=BARE,
            ratio_samples=paired_ratios(rss, base_rss),
            target=Target("<", 300, label="< 300 MB"),
            note=f"{median(column(mine, 'start_rss_mb')):.0f} MB after imports",
        )
    )
    lag, base_lag = column(mine, "lag_p99_ms"), column(base, "lag_p99_ms")
    section.add(
        Figure(
            f"{name}: event-loop lag p99",
            "ms",
            lag,
            baseline=BARE,
            ratio_samples=paired_ratios(lag, base_lag),
            target=lag_target,
            note=(
                f"p50 {median(column(mine, 'lag_p50_ms')):.2f} ms, "
                f"max {median(column(mine, 'lag_max_ms')):.0f} ms"
                + ("" if lag_target else "; the < 50 ms target is on the own_loop=True row")
            ),
        )
    )
    if no_store is None:
        section.add(
            Figure(
                f"{name}: calls with a stored `completed`",
                "calls",
                column(mine, "completed_calls"),
                target=Target("==", n, label=f"all {n:,}"),
                note=f"{median(column(mine, 'events')):,.0f} events stored per run",
            )
        )
    else:
        section.add(
            Figure(
                f"{name}: calls with a stored `completed`",
                "calls",
                [],
                error=f"skipped: {no_store}",
            )
        )
    rate, base_rate = column(mine, "calls_per_s"), column(base, "calls_per_s")
    section.add(
        Figure(
            f"{name}: throughput",
            "calls/s",
            rate,
            baseline=BARE,
            ratio_samples=paired_ratios(rate, base_rate),
            note=f"{median(column(mine, 'succeeded')):,.0f} of {n:,} calls succeeded",
        )
    )

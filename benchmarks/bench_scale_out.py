"""Scale out: what the shared (Redis) rate gate costs, and what four processes buy.

Two measurements, each side by side in one run:

- **Gate overhead per call**: one call's gate work (``acquire(1)``, ``mark_sent``,
  ``mark_done``) on an uncontended RPM gate, calls one after another, the in-process gate and
  the Redis gate interleaved round by round. The Redis figure includes the background
  worker's round trips: each repetition ends with ``flush()``.
- **Aggregate throughput**: ``BaseLLMService`` processes against the zero-latency local server
  (in its own process), all sharing one Redis gate whose budget is far above what they can
  send (so the gate is exercised, never binding): 1 process against 4 processes, the same
  number of calls in all. One process with the in-process gate is the reference. Worker
  processes start once and stay up; each repetition is a synchronised start of all of them.

Invariants:
- Figures are medians of repetitions; ratios are medians of paired ratios (same round).
- Redis at ``LLMTRAIL_REDIS_URL`` (default 127.0.0.1:6379); without it every figure is SKIP.
- The gate keys of a run are unique and deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ._harness import API_KEY, MODEL, column, mock_server, pick, prompt, run_interleaved
from ._report import Figure, Section, median, paired_ratios

REDIS_URL = os.environ.get("LLMTRAIL_REDIS_URL", "redis://127.0.0.1:6379/0")
CONCURRENCY = 50  # in flight per process
BIG_RPM = 6_000_000  # 100,000 per 1 s window: never binding
LOCAL, SHARED = "in-process gate", "Redis gate"
ONE_LOCAL, ONE, FOUR = "1 process, in-process gate", "1 process, Redis gate", "4 processes"


def _redis_down() -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return f"Redis is not reachable at {REDIS_URL} ({exc})"
    return None


def _delete_keys(key: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"llmtrail:gate:*{key}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# ---------------------------------------------------------------- gate overhead


async def _gate_overhead(kind: str, n: int, key: str) -> dict[str, float]:
    from llmtrail.pipeline import LoopClock
    from llmtrail.pipeline._redis_gates import RedisSlidingWindowGate, create_gate

    gate = create_gate(
        "rpm",
        100_000,
        1.0,
        clock=LoopClock(),
        send_guard_s=None,
        rate_limit_url=REDIS_URL if kind == SHARED else None,
        key=key,
    )
    try:
        if isinstance(gate, RedisSlidingWindowGate):
            await gate.start()  # connected and scripts loaded: not part of a call's cost
        started = time.perf_counter()
        for _ in range(n):
            res = await gate.acquire(1)
            gate.mark_sent(res)
            gate.mark_done(res)
        if isinstance(gate, RedisSlidingWindowGate):
            await gate.flush()
        elapsed = time.perf_counter() - started
    finally:
        if isinstance(gate, RedisSlidingWindowGate):
            await gate.aclose()
    return {"us_per_call": elapsed / n * 1e6}


async def _overhead_section(section: Section, quick: bool) -> None:
    reps = pick(quick, 7, 5, 3)
    n = pick(quick, 2_000, 500, 50)
    key = f"bench:{uuid.uuid4().hex}"
    try:
        results = await run_interleaved(
            [
                (LOCAL, lambda: _gate_overhead(LOCAL, n, key)),
                (SHARED, lambda: _gate_overhead(SHARED, n, key)),
            ],
            reps,
        )
    finally:
        _delete_keys(key)
    local, shared = column(results[LOCAL], "us_per_call"), column(results[SHARED], "us_per_call")
    section.add(Figure(f"gate work per call, {LOCAL}", "µs", local))
    section.add(
        Figure(
            f"gate work per call, {SHARED}",
            "µs",
            shared,
            baseline=LOCAL,
            ratio_samples=paired_ratios(shared, local),
            note=f"+{median(shared) - median(local):.0f} µs per call; {n:,} calls in a row",
        )
    )


# ---------------------------------------------------------------- throughput


async def _worker(conn: multiprocessing.connection.Connection, config: dict[str, Any]) -> None:
    from llmtrail.pipeline import BaseLLMService, GenerationRequest

    service = BaseLLMService(
        MODEL,
        max_rpm=BIG_RPM,
        rpm_window_seconds=1.0,
        max_concurrent_requests=CONCURRENCY,
        base_url=config["base_url"],
        api_key=config["api_key"],
        rate_limit_url=config["redis_url"],
        store_url=None,
        tracing=False,
        max_attempts=1,
    )
    async with service:
        await service.execute_generation_async(GenerationRequest(user_prompt="warm up"))
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command is None:
                break
            n, start_at = command
            await asyncio.sleep(max(start_at - time.time(), 0.0))
            started = time.time()
            results = await asyncio.gather(
                *(
                    service.execute_generation_async(
                        GenerationRequest(user_prompt=prompt(i), max_output_tokens=32)
                    )
                    for i in range(n)
                )
            )
            failed = sorted(
                {f"{r.error_type}: {r.error_message}" for r in results if not r.success}
            )
            ok = sum(r.success for r in results)
            conn.send({"start": started, "end": time.time(), "ok": ok, "errors": failed[:3]})


def _worker_main(conn: multiprocessing.connection.Connection, config: dict[str, Any]) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        asyncio.run(_worker(conn, config))
    finally:
        conn.close()


@contextlib.contextmanager
def _workers(
    count: int, config: dict[str, Any]
) -> Iterator[list[multiprocessing.connection.Connection]]:
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, config), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        for conn in conns:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a scale-out worker did not start within 120 s")
        yield conns
    finally:
        for conn in conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()


async def _round(
    conns: list[multiprocessing.connection.Connection], total: int
) -> dict[str, float]:
    share = total // len(conns)
    start_at = time.time() + 0.3  # every worker starts at the same instant
    for conn in conns:
        conn.send((share, start_at))
    reports = []
    for conn in conns:
        if not await asyncio.to_thread(conn.poll, 600):
            raise RuntimeError("a scale-out worker reported nothing within 600 s")
        reports.append(conn.recv())
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    ok = sum(r["ok"] for r in reports)
    if ok != share * len(conns):
        errors = sorted({e for r in reports for e in r["errors"]})
        raise RuntimeError(f"only {ok} of {share * len(conns)} calls succeeded: {errors[:3]}")
    return {"calls_per_s": ok / span}


async def _throughput_section(section: Section, quick: bool) -> None:
    reps = pick(quick, 5, 3, 1)
    total = pick(quick, 4_000, 1_000, 80)
    # One API key per run: the service keys its shared gate by the key's fingerprint.
    api_key = f"{API_KEY}-{uuid.uuid4().hex}"
    fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    with contextlib.ExitStack() as stack:
        url, _ = stack.enter_context(mock_server())
        base = {"base_url": f"{url}/v1", "api_key": api_key}
        local = stack.enter_context(_workers(1, {**base, "redis_url": None}))
        one = stack.enter_context(_workers(1, {**base, "redis_url": REDIS_URL}))
        four = stack.enter_context(_workers(4, {**base, "redis_url": REDIS_URL}))
        stack.callback(_delete_keys, fingerprint)
        results = await run_interleaved(
            [
                (ONE_LOCAL, lambda: _round(local, total)),
                (ONE, lambda: _round(one, total)),
                (FOUR, lambda: _round(four, total)),
            ],
            reps,
        )
    ref, single, multi = (column(results[v], "calls_per_s") for v in (ONE_LOCAL, ONE, FOUR))
    section.add(Figure(f"throughput, {ONE_LOCAL}", "calls/s", ref))
    section.add(
        Figure(
            f"throughput, {ONE}",
            "calls/s",
            single,
            baseline=ONE_LOCAL,
            ratio_samples=paired_ratios(single, ref),
        )
    )
    section.add(
        Figure(
            f"throughput, {FOUR}, one Redis budget",
            "calls/s",
            multi,
            baseline=ONE,
            ratio_samples=paired_ratios(multi, single),
            note=f"{os.cpu_count()} cores for 4 clients, the server and Redis",
        )
    )
    section.notes.append(
        f"throughput: {total:,} calls per round in all (split evenly across the processes), "
        f"{CONCURRENCY} in flight per process, zero-latency server in its own process, no "
        f"store, no tracing; {reps} rounds."
    )


# ---------------------------------------------------------------- entry point


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    section = Section("scale_out", "6. Scale out")
    down = _redis_down()
    if down is not None:
        for name in ("gate work per call", "throughput, 4 processes"):
            section.add(Figure(name, "", [], error=f"skipped: {down}"))
        return section.to_dict()
    await _overhead_section(section, quick)
    await _throughput_section(section, quick)
    section.notes.append(
        "gate work: acquire(1) + mark_sent + mark_done on an uncontended RPM gate, calls in a "
        "row; the Redis gate's background round trips are included (flush at the end)."
    )
    return section.to_dict()


if __name__ == "__main__":
    import json

    print(json.dumps(main(quick=True), indent=2))

"""Replay speed: 100,000 recorded calls (about 720,000 events) extracted from SQLite and replayed.

The store is filled first (not timed) through the storage writer, the service's own sink. The
events are synthesized the way the service emits them (same types, order and payload fields):
Poisson arrivals at ``RATE`` calls/s, provider latency ~ lognormal around 0.8 s, 3% of attempts
answered 429 with a retry-after and retried, 1% 5xx retried after backoff. The recorded limits
(about 75% of the TPM limit used, 50 permits) make the gates and the semaphore queue now and
then, as a healthy production service does.

A second figure, ``pressure_*``, replays a prefix of the same calls with the TPM limit cut so
that the TPM gate queues all the time, once with the service's default in-flight windows
(``send_guard_s=None``: a slot's window ends one window after its answer) and once with a
finite ``send_guard_s``: it measures the gate's own cost under sustained pressure, which is the
pipeline's (``SlidingWindowGate._next_fit_time``), not the replay's.

Timed: ``load_workload`` (one SQL query per event type) and ``replay`` with the recorded
settings (the same gates and semaphore as production, on virtual time). The target is
<= 10 s for both together on the reference machine.

Fidelity (full runs only, a few minutes: :mod:`benchmarks._replay_fidelity`): predictions from
one real run against the local server (seeded lognormal latency) compared with a second real
run under other settings: 2x and 0.5x RPM, 2x TPM, concurrency 10 to 40, max_attempts 1 to 3
with 5% 500s and 3% 429s, the gate off with the provider enforcing its limit; the identity of
each; and whether ``--target-p95``'s recommendation meets the target in a real run while the
next cheaper setting misses it. Reported as relative errors (predicted - real) / real.

``main(quick)`` returns the figures as a dict; ``python -m benchmarks.bench_replay [--quick]``
prints them (``--fidelity`` runs only the fidelity part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llmtrail.pipeline import Event, EventType

CALLS = 100_000
QUICK_CALLS = 10_000
RATE = 40.0  # calls per second: 100,000 calls over ~42 minutes
LIMITS = {
    "max_rpm": 2_700,
    "max_tpm": 2_500_000,
    "window_s": 60.0,
    "max_concurrent_requests": 50,
    "max_attempts": 3,
    "default_max_output_tokens": 1024,
    "send_guard_s": None,
    "unanswered_guard_s": 1.0,
}


class _Stream:
    """One call's events: ``emit(kind, t, payload)`` numbers them in order."""

    def __init__(self, index: int, trace_id: str, span_id: str, start: datetime) -> None:
        self.index, self.trace_id, self.span_id, self.start = index, trace_id, span_id, start
        self.seq = 0

    def __call__(self, kind: EventType, t: float, payload: dict[str, Any]) -> Event:
        event = Event(
            f"{self.index:032x}",
            self.seq,
            kind,
            self.start + timedelta(seconds=t),
            self.trace_id,
            self.span_id,
            payload,
            "bench:1",
            event_id=f"{self.index:024x}{self.seq:08x}",
        )
        self.seq += 1
        return event


def synthesize(calls: int, *, seed: int = 1) -> Iterator[Event]:
    """The event streams of ``calls`` calls, call after call (a plausible recording)."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    at = 0.0
    permits = int(LIMITS["max_concurrent_requests"] or 1)
    free_at: list[float] = [0.0] * permits  # crude concurrency model
    for i in range(calls):
        at += rng.expovariate(RATE)
        emit = _Stream(i, f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64):016x}", start)
        est = rng.randint(50, 800)
        max_out = rng.choice((None, 256, 512))
        reserve = est + (max_out or 1024)
        yield emit(
            EventType.TRACE_CREATED,
            at,
            {
                "operation_name": rng.choice(("summarize", "classify", "explain")),
                "model": "gpt-4o-mini",
                "request_id": None,
                "metadata": {"tenant": rng.choice(("acme", "globex"))},
                "estimated_input_tokens": est,
                "max_output_tokens": max_out,
                "reserved_tokens": reserve,
                "rpm_at_start": 0,
                "tpm_at_start": 0,
                "parent_span_id": None,
                "temperature": None,
                "reasoning_effort": None,
                "server_address": "api.openai.com",
                "server_port": 443,
                "capture_content": False,
                "limits": LIMITS,
            },
        )
        slot = min(range(len(free_at)), key=free_at.__getitem__)
        sem_wait = max(free_at[slot] - at, 0.0)
        t = at + sem_wait
        for gate, amount in (("rpm", 1), ("tpm", reserve)):
            yield emit(
                EventType.GATE_WAIT,
                at,
                {"gate": gate, "attempt": 1, "amount": amount, "waited_s": 0.0, "waiters_ahead": 0},
            )
        yield emit(
            EventType.SEMAPHORE_ACQUIRED,
            t,
            {"waited_s": sem_wait, "in_flight": 1, "waiters_ahead": 0},
        )
        inp = est + rng.randint(-20, 20)
        out = rng.randint(20, max_out or 600)
        for attempt in (1, 2, 3):
            if attempt > 1:
                yield emit(
                    EventType.GATE_WAIT,
                    t,
                    {
                        "gate": "rpm",
                        "attempt": attempt,
                        "amount": 1,
                        "waited_s": 0.0,
                        "waiters_ahead": 0,
                    },
                )
            yield emit(EventType.SENT, t, {"attempt": attempt})
            latency = rng.lognormvariate(math.log(0.8), 0.5)
            draw = rng.random()
            if attempt < 3 and draw < 0.04:
                status, error, retry_after = (
                    (429, "rate_limited", 1.0) if draw < 0.03 else (503, "server_error", None)
                )
                latency = min(latency, 0.2)
                t += latency
                yield emit(
                    EventType.ATTEMPT_FAILED,
                    t,
                    {
                        "attempt": attempt,
                        "latency_s": latency,
                        "error_type": error,
                        "status": status,
                        "retryable": True,
                        "retry_after_s": retry_after,
                        "message": "synthetic",
                        "provider_code": None,
                        "provider_request_id": None,
                        "rate_limits": {},
                    },
                )
                wait = retry_after if retry_after is not None else rng.uniform(0, 0.5 * 2**attempt)
                yield emit(
                    EventType.RETRY_SCHEDULED,
                    t,
                    {
                        "attempt": attempt,
                        "next_attempt": attempt + 1,
                        "wait_s": wait,
                        "reason": error,
                        "retry_after_s": retry_after,
                    },
                )
                t += wait
                continue
            t += latency
            yield emit(
                EventType.RECEIVED,
                t,
                {
                    "attempt": attempt,
                    "latency_s": latency,
                    "status": 200,
                    "response_id": f"resp_{i:x}",
                    "response_model": "gpt-4o-mini-2024-07-18",
                    "finish_reasons": ["stop"],
                    "input_tokens": inp,
                    "cached_tokens": 0,
                    "output_tokens": out,
                    "reasoning_tokens": 0,
                    "total_tokens": inp + out,
                    "cost_usd": "0.0001",
                    "provider_request_id": f"req_{i:x}",
                    "rate_limits": {"x-ratelimit-remaining-requests": "2000"},
                },
            )
            break
        free_at[slot] = t
        yield emit(
            EventType.COMPLETED,
            t,
            {
                "outcome": "succeeded",
                "error_type": None,
                "error_message": None,
                "attempts": attempt,
                "input_tokens": inp,
                "cached_tokens": 0,
                "output_tokens": out,
                "reasoning_tokens": 0,
                "total_tokens": inp + out,
                "cost_usd": "0.0001",
                "model": "gpt-4o-mini-2024-07-18",
                "response_id": f"resp_{i:x}",
                "rpm_wait_s": 0.0,
                "tpm_wait_s": 0.0,
                "semaphore_wait_s": sem_wait,
                "latency_s": latency,
                "total_s": t - at,
            },
        )


async def fill_store(url: str, calls: int) -> int:
    """Write the synthesized events into the store at ``url`` through the storage writer (the
    service's own sink, which migrates a new store); returns the number of events."""
    from llmtrail.storage import open_store_sink

    writer = open_store_sink(url, max_queue=50_000)
    await writer.start()
    count = 0
    try:
        for event in synthesize(calls):
            if not writer.emit(event):
                await writer.wait_for_room()  # backpressure, as the service applies it
            count += 1
        await writer.flush()
    finally:
        await writer.aclose()
    return count


async def _load(url: str) -> Any:
    from llmtrail.storage import EventStore
    from llmtrail.storage._workload_read import load_workload

    store = await EventStore.open(url)
    try:
        return await load_workload(store.engine)
    finally:
        await store.aclose()


def measure(url: str, quick: bool) -> dict[str, Any]:
    """Extraction + replay of the store at ``url``, timed (run in a fresh process by main)."""
    # Imported before the clock starts: the figure is extraction + replay, not imports.
    from llmtrail.storage import EventStore  # noqa: F401
    from llmtrail.storage._replay import replay
    from llmtrail.storage._replay_model import ReplaySettings
    from llmtrail.storage._workload import Workload

    cpu0, t0 = time.process_time(), time.perf_counter()
    workload = asyncio.run(_load(url))
    cpu1, t1 = time.process_time(), time.perf_counter()
    result = replay(workload)
    cpu2, t2 = time.process_time(), time.perf_counter()
    figures = result.figures
    out: dict[str, Any] = {
        "extract_s": round(t1 - t0, 3),
        "replay_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
        "total_cpu_s": round(cpu2 - cpu0, 3),
        "extract_cpu_s": round(cpu1 - cpu0, 3),
        "replay_cpu_s": round(cpu2 - cpu1, 3),
        "target_s": 10.0,
        "meets_target": (t2 - t0) <= 10.0,
        "simulated_makespan_s": round(figures.makespan_s, 1),
        "simulated_p95_s": round(figures.total_latency_s["p95"], 3),
        "simulated_peak_queue": figures.peak_queue,
    }
    prefix = Workload(
        workload.calls[: 1_000 if quick else 5_000], workload.start, workload.settings
    )
    # 80% of the prefix's token rate: the TPM gate queues from the first window on.
    rate = sum(c.tpm_counted for c in prefix.calls) / max(prefix.span_s, 60.0) * 60.0
    pressure_tpm = int(rate * 0.8)
    out["pressure_calls"] = len(prefix.calls)
    out["pressure_max_tpm"] = pressure_tpm
    for name, guard in (("default_windows", None), ("send_guard_0.02", 0.02)):
        settings = ReplaySettings.recorded(prefix, max_tpm=pressure_tpm, send_guard_s=guard)
        t = time.perf_counter()
        pressured = replay(prefix, settings)
        out[f"pressure_{name}_s"] = round(time.perf_counter() - t, 3)
        out[f"pressure_{name}_tpm_wait_mean_s"] = round(
            pressured.figures.gate_wait_s["tpm"]["mean"], 2
        )
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def fidelity() -> dict[str, Any]:
    """The fidelity comparisons (module docs), summarised: relative errors and counts."""
    from ._replay_fidelity import main as run

    raw = asyncio.run(run())
    out: dict[str, Any] = {}
    for name, result in raw.items():
        if name == "target_p95":
            out[name] = result
            continue
        summary: dict[str, Any] = {}
        for part in ("identity", "what_if", "what_if_client_cpu"):
            compared = result[part]
            summary[part] = {
                f"{metric}_error": compared["error"][metric]
                for metric in ("p50_s", "p95_s", "makespan_s")
            } | {
                f"{metric}_predicted_vs_real": (
                    f"{compared['predicted'][metric]:g} vs {compared['actual'][metric]:g}"
                )
                for metric in ("failed", "rate_limited")
            }
        summary["client_cpu_ms"] = (result["client_cpu_s"] or 0.0) * 1000
        out[name] = summary
    return out


def main(quick: bool = False) -> dict[str, Any]:
    calls = QUICK_CALLS if quick else CALLS
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'replay.db'}"
        t = time.perf_counter()
        n_events = asyncio.run(fill_store(url, calls))
        fill_s = time.perf_counter() - t
        # Measured in a fresh interpreter, as `llmtrail replay` runs: not in this one, whose
        # heap still holds what writing 700,000 events left behind.
        argv = [sys.executable, "-m", "benchmarks.bench_replay", "--measure", url]
        child = subprocess.run(
            argv + (["--quick"] if quick else []),
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            check=False,
        )
    if child.returncode != 0:
        raise RuntimeError(f"the measurement failed: {child.stderr.strip()[-2000:]}")
    measured: dict[str, Any] = json.loads(child.stdout)
    out = {"calls": calls, "events": n_events, "fill_s": round(fill_s, 2)} | measured
    if not quick:
        out["fidelity"] = fidelity()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CALLS} calls instead")
    parser.add_argument("--measure", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--fidelity", action="store_true", help="only the fidelity comparisons")
    args = parser.parse_args()
    if args.fidelity:
        print(json.dumps(fidelity(), indent=2))
    elif args.measure:
        print(json.dumps(measure(args.measure, args.quick)))
    else:
        print(json.dumps(main(args.quick), indent=2))

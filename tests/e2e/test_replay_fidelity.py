"""Replay fidelity, end to end: real runs recorded in a real store, replayed, compared.

Each run is a real ``BaseLLMService`` calling the local OpenAI-compatible server over
loopback with a known latency distribution, recording every event in its own SQLite file
(its own file, so that no run warms its gates from another's sends). The workload is then read
back from the store by ``load_workload`` and replayed on virtual time. The runs are short
(a few seconds each); their latencies are large next to the client's own CPU time per call,
which the replay does not model (it replays provider latency as measured, client work as free).
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from llmtrail.storage import EventStore
from llmtrail.storage._replay import ReplaySettings, recorded_figures, replay_async
from llmtrail.storage._workload import Workload
from llmtrail.storage._workload_read import load_workload
from llmtrail.testing.fixtures import MockServerFactory


async def _record(
    server_url: str,
    store: Path,
    arrivals: list[float],
    *,
    warm_up: int = 0,
    **limits: Any,
) -> Workload:
    """Run one call per arrival offset through the service; return the stored workload.

    ``warm_up`` calls go first, together, and the workload starts after them: a production
    service runs with its connections open, and without a warm-up the first calls of each run
    pay for opening them (more of them at a higher RPM limit), which no replay of the other
    run can know. Their gate slots expire before the measured calls start.
    """
    url = f"sqlite+aiosqlite:///{store}"
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{server_url}/v1",
        api_key="sk-test",
        store_url=url,
        tracing=False,
        **limits,
    ) as service:

        async def one(i: int, at: float) -> bool:
            await asyncio.sleep(at)
            result = await service.execute_generation_async(
                GenerationRequest(user_prompt=f"Summarize item {i} in one line."),
                operation_name="summarize",
            )
            return result.success

        if warm_up:
            await asyncio.gather(*(one(i, 0.0) for i in range(warm_up)))
            await asyncio.sleep(limits.get("rpm_window_seconds", 60.0) + 1.0)
        since = datetime.now(UTC)
        results = await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))
    assert all(results), "the recorded run must not fail: the local server injects no faults"
    reader = await EventStore.open(url)
    try:
        return await load_workload(reader.engine, since=since)
    finally:
        await reader.aclose()


def _close(simulated: float, recorded: float, tolerance: float) -> bool:
    return abs(simulated - recorded) <= tolerance * recorded


async def test_replay_with_recorded_settings_reproduces_latency_and_makespan(
    mock_server_factory: MockServerFactory, tmp_path: Path
) -> None:
    # 150 calls arriving at ~60/s for 2.5 s; the provider answers in 0.25-0.45 s. Ten permits
    # serve ~30 calls/s, so a queue builds at the semaphore; the RPM gate (40 per 1 s window,
    # each slot held until a window after its answer) binds as well. Both queues must be
    # reproduced for the latencies to match.
    server = await mock_server_factory(latency_s=0.25, latency_jitter_s=0.2, seed=11)
    rng = random.Random(5)
    arrivals, at = [], 0.0
    for _ in range(150):
        arrivals.append(at)
        at += rng.expovariate(60.0)
    workload = await _record(
        server.url,
        tmp_path / "recorded.db",
        arrivals,
        max_rpm=2_400,
        rpm_window_seconds=1.0,
        max_concurrent_requests=10,
    )
    assert len(workload.calls) == 150
    assert workload.settings.max_rpm == 2_400
    assert workload.settings.window_s == 1.0
    assert workload.settings.max_concurrent_requests == 10

    recorded = recorded_figures(workload)
    simulated = (await replay_async(workload, ReplaySettings.recorded(workload))).figures
    # The run really queued (otherwise the test would only replay latencies).
    assert recorded.queue_delay_s["p95"] > 1.0
    assert recorded.gate_wait_s["rpm"]["p95"] > 0.1
    for name, sim, rec in (
        ("p50", simulated.total_latency_s["p50"], recorded.total_latency_s["p50"]),
        ("p95", simulated.total_latency_s["p95"], recorded.total_latency_s["p95"]),
        ("makespan", simulated.makespan_s, recorded.makespan_s),
    ):
        assert _close(sim, rec, 0.05), f"{name}: simulated {sim:.3f} s, recorded {rec:.3f} s"


@pytest.mark.slow
async def test_doubled_rpm_prediction_matches_a_real_run_with_doubled_rpm(
    mock_server_factory: MockServerFactory, tmp_path: Path
) -> None:
    # RPM-bound: 60 calls at once, 10 slots per 0.5 s window (1,200 RPM), each slot free again
    # a window after its answer (0.5-0.6 s): six waves. Doubling the limit makes it three; the
    # replay of the first run must predict the second run's makespan.
    server = await mock_server_factory(latency_s=0.5, latency_jitter_s=0.1, seed=3)
    arrivals = [0.0] * 60
    limits: dict[str, Any] = {"rpm_window_seconds": 0.5, "max_concurrent_requests": 60}
    base = await _record(
        server.url, tmp_path / "x1.db", arrivals, warm_up=10, max_rpm=1_200, **limits
    )
    assert len(base.calls) == 60
    x1 = recorded_figures(base)
    assert x1.gate_wait_s["rpm"]["p95"] > 3.0, "the first run must be RPM-bound"

    predicted = (await replay_async(base, ReplaySettings.recorded(base, max_rpm=2_400))).figures
    assert predicted.makespan_s < 0.6 * x1.makespan_s  # the knob really mattered
    # This machine is shared: another process can only slow a real run down, never speed it
    # up, so the faster of two runs is the better measure of the pipeline itself.
    runs = []
    for i in range(2):
        doubled = await _record(
            server.url, tmp_path / f"x2-{i}.db", arrivals, warm_up=20, max_rpm=2_400, **limits
        )
        runs.append(recorded_figures(doubled).makespan_s)
    actual = min(runs)
    assert _close(predicted.makespan_s, actual, 0.10), (
        f"predicted {predicted.makespan_s:.3f} s, real run {actual:.3f} s"
    )


@pytest.fixture(autouse=True)
def _no_ambient_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runs name their stores; an LLMTRAIL_STORE_URL in the environment must not interfere.
    monkeypatch.delenv("LLMTRAIL_STORE_URL", raising=False)

"""Replay fidelity, end to end: real runs recorded in a real store, replayed, compared.

Each run is a real ``BaseLLMService`` calling the local OpenAI-compatible server over
loopback with a known latency distribution, recording every event in its own SQLite file
(its own file, so that no run warms its gates from another's sends). The workload is then read
back from the store by ``load_workload`` and replayed on virtual time. The runs are short
(a few seconds each, windows of 1 s); their latencies are large next to the client's own CPU
time per call. The longer comparisons, scenario by scenario, are in benchmarks/bench_replay.py.
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
from llmtrail.storage._replay import replay_async
from llmtrail.storage._replay_figures import recorded_figures
from llmtrail.storage._replay_model import ReplaySettings, provider_defaults
from llmtrail.storage._replay_plan import recommend, sweep
from llmtrail.storage._workload import Workload
from llmtrail.storage._workload_read import extract_workload, load_workload
from llmtrail.testing import MockServer, RecordingSink
from llmtrail.testing.fixtures import MockServerFactory


async def _record(
    server_url: str,
    store: Path,
    arrivals: list[float],
    *,
    warm_up: int = 0,
    reset: MockServer | None = None,
    may_fail: bool = False,
    **limits: Any,
) -> Workload:
    """Run one call per arrival offset through the service; return the stored workload.

    ``warm_up`` calls go first, together, and the workload starts after them: a production
    service runs with its connections open, and without a warm-up the first calls of each run
    pay for opening them (more of them at a higher RPM limit), which no replay of the other
    run can know. Their gate slots expire before the measured calls start. ``reset``: the
    server whose window, log and fault sequence are reset after the warm-up.
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
        if reset is not None:
            reset.reset()
        since = datetime.now(UTC)
        results = await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))
    if not may_fail:
        assert all(results), "the recorded run must not fail: the local server injects no faults"
    reader = await EventStore.open(url)
    try:
        return await load_workload(reader.engine, since=since)
    finally:
        await reader.aclose()


async def test_each_attempt_records_when_its_answers_first_bytes_came(
    mock_server_factory: MockServerFactory, recorder: RecordingSink
) -> None:
    # The server holds every answer 0.2 s (a stream's head comes at once, the rest after 0.2 s);
    # its first arrival gets a 500 (retried).
    server = await mock_server_factory(latency_s=0.2, fault_script=("http_500",))
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{server.url}/v1",
        api_key="sk-test",
        store_url=None,
        tracing=False,
        sinks=[recorder],
        retry_backoff_base_s=0.01,
    ) as service:
        plain = await service.execute_generation_async(GenerationRequest(user_prompt="hi"))
        stream = service.execute_generation_stream(GenerationRequest(user_prompt="hi"))
        async with stream:
            async for _ in stream:
                pass
    assert plain.success
    failed = [e.payload for e in recorder.events if str(e.type) == "attempt_failed"]
    answers = [e.payload for e in recorder.events if str(e.type) == "received"]
    (first_token,) = [e.payload for e in recorder.events if str(e.type) == "first_token"]
    assert [p["status"] for p in failed] == [500] and len(answers) == 2
    for p in [*failed, *answers]:  # sent, body written, headers read, answer: in that order
        assert 0 <= p["body_sent_s"] < p["first_byte_s"] <= p["latency_s"]
    assert all(p["first_byte_s"] - p["body_sent_s"] >= 0.2 for p in (failed[0], answers[0]))
    # A stream's headers come before its first chunk, which waited the 0.2 s.
    assert answers[1]["first_byte_s"] < 0.2 <= first_token["ttft_s"] - answers[1]["body_sent_s"]

    # The workload takes the provider's time from them (a stream's: to the end of the stream).
    calls = extract_workload(recorder.events).calls
    (a_500, a_200), (a_stream,) = (c.attempts for c in calls)
    for attempt, p in ((a_500, failed[0]), (a_200, answers[0])):
        assert attempt.provider_s == pytest.approx(p["first_byte_s"] - p["body_sent_s"])
    assert a_stream.provider_s == pytest.approx(answers[1]["latency_s"] - answers[1]["body_sent_s"])


def _close(simulated: float, recorded: float, tolerance: float) -> bool:
    return abs(simulated - recorded) <= tolerance * recorded


@pytest.mark.slow
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

    # The provider's own time (openai-processing-ms) is kept apart from the client's: the
    # server slept 0.25-0.45 s per answer, and the client measured that plus its own time.
    answers = [a for c in workload.calls for a in c.attempts if a.error_type is None]
    assert all(a.provider_s is not None for a in answers)
    assert all(0.24 <= a.provider_s <= a.latency_s for a in answers)  # type: ignore[operator]
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
    # a window after its request arrived (the body written + arrival_guard_s, well before the
    # 0.5-0.6 s answer): six waves. Doubling the limit makes it three; the replay of the first
    # run must predict the second run's makespan.
    server = await mock_server_factory(latency_s=0.5, latency_jitter_s=0.1, seed=3)
    arrivals = [0.0] * 60
    limits: dict[str, Any] = {"rpm_window_seconds": 0.5, "max_concurrent_requests": 60}
    base = await _record(
        server.url, tmp_path / "x1.db", arrivals, warm_up=10, max_rpm=1_200, **limits
    )
    assert len(base.calls) == 60
    x1 = recorded_figures(base)
    assert x1.gate_wait_s["rpm"]["p95"] > 2.0, "the first run must be RPM-bound"

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


def _poisson(n: int, rate: float, seed: int = 5) -> list[float]:
    rng = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in range(n):
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


@pytest.mark.slow
async def test_gate_off_prediction_matches_a_real_run_against_an_enforcing_provider(
    mock_server_factory: MockServerFactory, tmp_path: Path
) -> None:
    # The provider takes 30 requests per 1 s window and counts the ones it refuses; 100 calls
    # arrive at 50/s. Run A holds the gate at the provider's limit (nothing fails); the replay
    # of A with the gate off must turn the provider model on by itself (from the limit the
    # provider stated in its headers) and predict run B's 429 storm.
    server = await mock_server_factory(
        latency_s=0.2,
        latency_sigma=0.5,
        seed=7,
        rpm_limit=1_800,
        window_s=1.0,
        count_rate_limited=1,
    )
    arrivals = _poisson(100, 50.0)
    w1: dict[str, Any] = {"rpm_window_seconds": 1.0}
    # The server shares the client's event loop here, so its arrival stamp can trail the
    # body's write by the loop's own lag: a wider guard than the 0.1 s default covers it.
    a = await _record(
        server.url,
        tmp_path / "a.db",
        arrivals,
        warm_up=10,
        reset=server,
        max_rpm=1_800,
        arrival_guard_s=0.3,
        **w1,
    )
    assert recorded_figures(a).failed == 0 and recorded_figures(a).rate_limited == 0
    settings, notes = provider_defaults(a, ReplaySettings.recorded(a, max_rpm=None))
    assert settings.provider_rpm == 1_800 and settings.provider_window_s == 1.0
    assert "provider model ON" in notes[0]
    predicted = (await replay_async(a, settings)).figures
    b = await _record(
        server.url,
        tmp_path / "b.db",
        arrivals,
        warm_up=10,
        reset=server,
        may_fail=True,
        max_rpm=None,
        **w1,
    )
    real = recorded_figures(b)
    assert real.failed > 10 and real.rate_limited > 50  # the storm really happened
    for name, sim, rec in (
        ("429s", predicted.rate_limited, real.rate_limited),
        ("failed", predicted.failed, real.failed),
        ("p95", predicted.total_latency_s["p95"], real.total_latency_s["p95"]),
    ):
        assert _close(sim, rec, 0.10), f"{name}: predicted {sim:.3f}, real run {rec:.3f}"


@pytest.mark.slow
async def test_more_attempts_prediction_matches_a_real_run_with_injected_faults(
    mock_server_factory: MockServerFactory, tmp_path: Path
) -> None:
    # 5% of answers are 500s and 3% injected 429s (with room left: not the limit). With one
    # attempt about 8% of calls fail; the replay of that run with three attempts must predict
    # that almost none do, and the extra requests the retries cost.
    server = await mock_server_factory(
        latency_s=0.2, latency_sigma=0.5, seed=7, fault_500_rate=0.05, fault_429_rate=0.03
    )
    # 900 calls, so that the p95 (among the ~70 retried ones) is not a handful of backoff draws.
    arrivals = _poisson(900, 100.0)
    w1: dict[str, Any] = {"rpm_window_seconds": 1.0}
    a = await _record(
        server.url, tmp_path / "a.db", arrivals, reset=server, may_fail=True, max_attempts=1, **w1
    )
    once = recorded_figures(a)
    assert 40 <= once.failed <= 110, once.failures_by_type  # 8% of 900 is 72
    predicted = (await replay_async(a, ReplaySettings.recorded(a, max_attempts=3))).figures
    # The faster of two real runs (the machine is shared: another process only slows a run).
    runs = []
    for i in range(2):
        b = await _record(
            server.url,
            tmp_path / f"b{i}.db",
            arrivals,
            reset=server,
            may_fail=True,
            max_attempts=3,
            **w1,
        )
        runs.append(recorded_figures(b))
    real = min(runs, key=lambda f: f.total_latency_s["mean"])
    # Each attempt fails with p ~ 0.08, so three in a row are rare: far fewer failures.
    assert predicted.failed <= once.failed / 4 and real.failed <= once.failed / 4
    assert _close(predicted.requests, real.requests, 0.05)
    # The p95 falls among the retried calls (8% of them retry), whose backoff is a random draw
    # in the replay and in each real run. With 300 calls the prediction was -17% to +8% of the
    # faster real run; with 900, 0% to +11% in three runs. The bound is 20%, so that a random
    # draw does not fail the suite; the benchmark reports the figure against the 10% target.
    assert _close(predicted.total_latency_s["p95"], real.total_latency_s["p95"], 0.20)


@pytest.mark.slow
async def test_the_recommended_rpm_meets_the_target_in_a_real_run_and_the_next_cheaper_misses(
    mock_server_factory: MockServerFactory, tmp_path: Path
) -> None:
    server = await mock_server_factory(latency_s=0.2, latency_sigma=0.5, seed=7)
    arrivals = _poisson(120, 50.0)
    w1: dict[str, Any] = {"rpm_window_seconds": 1.0}
    a = await _record(
        server.url, tmp_path / "a.db", arrivals, warm_up=10, reset=server, max_rpm=1_200, **w1
    )
    rows = await asyncio.to_thread(
        sweep, a, ReplaySettings.recorded(a), [("max_rpm", [1_200, 1_500, 1_800, 2_400, 3_000])]
    )
    target = 1.5
    choice = recommend(rows, target_p95_s=target)
    assert choice.row is not None and choice.next_cheaper is not None, choice.evidence
    p95 = {}
    for row in (choice.row, choice.next_cheaper):
        rpm = row.knobs["max_rpm"]
        run = await _record(
            server.url,
            tmp_path / f"{rpm}.db",
            arrivals,
            warm_up=10,
            reset=server,
            max_rpm=rpm,
            **w1,
        )
        p95[rpm] = recorded_figures(run).total_latency_s["p95"]
    assert p95[choice.row.knobs["max_rpm"]] <= target, (choice.line, p95)
    assert p95[choice.next_cheaper.knobs["max_rpm"]] > target, (choice.line, p95)


@pytest.fixture(autouse=True)
def _no_ambient_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runs name their stores; an LLMTRAIL_STORE_URL in the environment must not interfere.
    monkeypatch.delenv("LLMTRAIL_STORE_URL", raising=False)

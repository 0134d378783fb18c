"""Replay: workload extraction, the virtual-time simulation and its knobs.

Workloads are built from event streams shaped exactly as the service emits them (the
``Recording`` helper of replay_recording.py), so extraction is exercised by every test.
Expected figures are derived by hand from the gates' documented rules (a slot's window ends one
window after its answer; capacity = limit x window / 60), not read back from the
implementation.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from llmtrail.pipeline import Event, EventType, PriceTable
from llmtrail.storage._replay import replay, replay_async
from llmtrail.storage._replay_figures import recorded_figures
from llmtrail.storage._replay_model import (
    FaultModel,
    ProviderModel,
    ReplaySettings,
    calibrated_client_cpu,
    provider_defaults,
    scaled_calls,
)
from llmtrail.storage._workload import EmptyWorkloadError, ProviderLimits

from .replay_recording import T0, Recording, burst, load, write

# -- extraction -----------------------------------------------------------------------------


def test_extraction_reads_arrivals_attempts_waits_tokens_and_limits() -> None:
    rec = Recording(max_rpm=600, max_concurrent_requests=7)
    rec.call(2.0, [{"latency": 0.5}], input_tokens=120, output_tokens=30, max_output_tokens=64)
    rec.call(
        3.0,
        [
            {"latency": 0.1, "error": "rate_limited", "retry_after": 1.5, "wait": 1.5},
            {"latency": 0.2, "error": "connection", "refused": True, "wait": 0.25},
            {"latency": 0.7},
        ],
    )
    rec.call(4.0, unsent=True, error_type="validation")
    rec.events.append(  # a call still in flight: started, never completed
        Event("open", 0, EventType.TRACE_CREATED, T0 + timedelta(seconds=5), "1" * 32, "1" * 16, {})
    )
    workload = rec.workload()

    assert workload.start == T0 + timedelta(seconds=2)
    assert workload.incomplete == 1
    assert workload.settings.max_rpm == 600
    assert workload.settings.max_tpm is None
    assert workload.settings.max_concurrent_requests == 7
    first, second, third = workload.calls
    assert (first.arrival_s, second.arrival_s, third.arrival_s) == (0.0, 1.0, 2.0)
    assert first.model == "gpt-4o-mini" and first.response_model == "gpt-4o-mini-2024-07-18"
    assert (first.input_tokens, first.output_tokens) == (120, 30)
    assert first.reserved_tokens == 120 + 64
    assert first.tpm_counted == 120 + 64  # input + max_output_tokens, as the provider counts
    assert first.attempts[0].latency_s == 0.5 and first.attempts[0].error_type is None
    a1, a2, a3 = second.attempts
    assert (a1.error_type, a1.retry_after_s, a1.wait_s, a1.reached, a1.answered) == (
        "rate_limited",
        1.5,
        1.5,
        True,
        True,
    )
    assert (a2.error_type, a2.reached, a2.answered, a2.wait_s) == ("connection", False, False, 0.25)
    assert a3.error_type is None and a3.wait_s is None
    assert second.tpm_counted == 100 + 50  # no max_output_tokens: input + output
    assert third.attempts == () and third.error_type == "validation"


def test_extraction_keeps_only_calls_started_in_the_range() -> None:
    rec = Recording()
    for at in (0.0, 10.0, 20.0, 30.0):
        rec.call(at)
    workload = rec.workload(since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=30))
    assert [c.arrival_s for c in workload.calls] == [0.0, 10.0]
    assert workload.start == T0 + timedelta(seconds=10)


def test_an_empty_range_raises_empty_workload_error() -> None:
    rec = Recording()
    rec.call(0.0)
    with pytest.raises(EmptyWorkloadError, match="no completed call"):
        rec.workload(since=T0 + timedelta(hours=1))


async def test_provider_time_is_first_byte_minus_body_sent_else_the_providers_header(
    store_url: str,
) -> None:
    rec = Recording()
    hook = {"body_sent": 0.004, "first_byte": 0.254}
    rec.call(0.0, [{"latency": 0.3, "processing": 0.2, **hook}])  # the hook's figure wins
    rec.call(0.1, [{"latency": 0.3, "processing": 0.2}])  # no hook: the header's
    rec.call(0.2, [{"latency": 0.3}])  # neither: None (a replay takes the latency)
    rec.call(0.3, [{"latency": 0.3, "processing": 0.2, "body_sent": 0.004}])  # an older row
    rec.call(0.4, [{"latency": 2.0, "processing": 0.05, "streamed": True, **hook}])
    rec.call(
        0.5,
        [
            {"latency": 0.3, "error": "server_error", "status": 500, "wait": 0.1, **hook},
            {"latency": 0.3, "error": "timeout", "body_sent": 0.004, "wait": 0.1},
            {"latency": 0.3},
        ],
    )
    await write(store_url, rec.events)
    for workload in (rec.workload(), await load(store_url)):
        provider = [[a.provider_s for a in c.attempts] for c in workload.calls]
        assert provider == [
            [pytest.approx(0.25)],
            [0.2],
            [None],
            [0.2],
            [pytest.approx(1.996)],  # a stream's provider time runs to its end
            [pytest.approx(0.25), None, None],  # an answered failure has one too
        ]


async def test_the_store_reader_extracts_what_the_event_reader_does(store_url: str) -> None:
    rec = Recording(max_rpm=120, max_tpm=90_000, window_s=2.0)
    stated = {
        "x-ratelimit-limit-requests": "300",
        "x-ratelimit-limit-tokens": "1000000000",
        "x-ratelimit-reset-requests": "1.95s",
    }
    rec.call(0.0, [{"latency": 0.5, "processing": 0.42, "headers": stated}], max_output_tokens=32)
    rec.call(
        0.25,
        [
            {
                "latency": 0.01,
                "error": "rate_limited",
                "retry_after": 0.1,
                "wait": 0.1,
                "headers": {**stated, "x-ratelimit-remaining-requests": "0"},
            },
            {
                "latency": 0.01,
                "error": "rate_limited",
                "retry_after": 0.1,
                "wait": 0.1,
                "headers": {**stated, "x-ratelimit-remaining-requests": "7"},
            },
            {"latency": 0.1, "error": "server_error", "status": 503, "wait": 0.8},
            {"latency": 0.2, "error": "connection", "refused": True, "wait": 0.4},
            {"latency": 0.3},
        ],
    )
    rec.call(1.0, unsent=True, error_type="too_large")
    rec.call(9.0)
    await write(store_url, rec.events)

    expected = rec.workload(until=T0 + timedelta(seconds=5))
    loaded = await load(store_url, until=T0 + timedelta(seconds=5))
    # Provider time, limit vs other 429s and the stated limits come through both readers.
    assert expected.calls[0].attempts[0].provider_s == 0.42
    assert [a.limit_hit for a in expected.calls[1].attempts] == [True, False, False, False, False]
    assert expected.provider_limits == ProviderLimits(rpm=300, tpm=None, window_s=2.0)
    assert loaded.provider_limits == expected.provider_limits
    assert loaded.settings == expected.settings
    assert loaded.start == expected.start
    assert len(loaded.calls) == 3
    for got, want in zip(loaded.calls, expected.calls, strict=True):
        assert got._replace(arrival_s=0, finished_s=0, first_sent_s=0) == want._replace(
            arrival_s=0, finished_s=0, first_sent_s=0
        )
        assert got.arrival_s == pytest.approx(want.arrival_s, abs=1e-6)
        assert got.finished_s == pytest.approx(want.finished_s, abs=1e-6)


async def test_the_store_reader_reads_timestamps_exactly_near_a_whole_second(
    sqlite_url: str,
) -> None:
    # SQLite's strftime('%s') rounds to the millisecond: read naively, 10:00:00.9996 comes
    # out as 10:00:01 + 0.9996 s, a second late, and the two calls swap order.
    rec = Recording()
    rec.call(0.9996)
    rec.call(1.0002)
    await write(sqlite_url, rec.events)
    loaded = await load(sqlite_url)
    assert loaded.start == T0 + timedelta(seconds=0.9996)
    assert [c.arrival_s for c in loaded.calls] == pytest.approx([0.0, 0.0006], abs=1e-6)
    assert loaded.calls[0].finished_s == pytest.approx(1.0, abs=1e-6)


async def test_the_store_reader_says_how_to_fix_an_empty_range(sqlite_url: str) -> None:
    rec = Recording()
    rec.call(0.0)
    await write(sqlite_url, rec.events)
    with pytest.raises(EmptyWorkloadError, match="widen --since/--until"):
        await load(sqlite_url, since=T0 + timedelta(days=1))


# -- the simulation -------------------------------------------------------------------------


def test_recorded_settings_reproduce_an_unconstrained_recording_exactly() -> None:
    rec = Recording()
    for i in range(20):
        rec.call(i * 0.3, [{"latency": 0.5 + (i % 5) * 0.1}])
    workload = rec.workload()
    result = replay(workload)
    recorded = recorded_figures(workload)
    assert result.figures.makespan_s == pytest.approx(recorded.makespan_s, abs=1e-9)
    assert result.figures.total_latency_s == pytest.approx(recorded.total_latency_s, abs=1e-9)
    assert result.figures.requests == recorded.requests == 20


def test_concurrency_limit_queues_calls_in_waves() -> None:
    workload = burst(10, latency=1.0)
    result = replay(workload, ReplaySettings.recorded(workload, max_concurrent_requests=2))
    f = result.figures
    assert f.makespan_s == pytest.approx(5.0)  # 5 waves of 2
    assert f.peak_queue == 8
    assert f.queue_delay_s["p50"] == pytest.approx(2.0)  # waits of 0,0,1,1,2,2,3,3,4,4
    assert f.gate_wait_s["semaphore"]["mean"] == pytest.approx(2.0)
    assert sorted(result.run.first_sent) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_rpm_gate_admits_a_window_after_each_answer() -> None:
    # capacity = 120 x 1 s / 60 = 2 per window; a slot frees one window (1 s) after its
    # answer, so pairs are sent at 0, 1.5, 3, 4.5 and 6 (plus the gate's 1 ms tie-breaking
    # margin per wave, hence the tolerance).
    workload = burst(10, latency=0.5)
    settings = ReplaySettings.recorded(workload, max_rpm=120, window_s=1.0)
    result = replay(workload, settings)
    sends = sorted(result.run.first_sent)
    assert sends == pytest.approx([0, 0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6, 6], abs=0.01)
    assert result.figures.makespan_s == pytest.approx(6.5, abs=0.01)
    assert result.figures.gate_wait_s["rpm"]["p95"] == pytest.approx(6.0, abs=0.01)


def test_doubling_max_rpm_halves_the_waves() -> None:
    workload = burst(12, latency=0.5)
    slow = replay(workload, ReplaySettings.recorded(workload, max_rpm=120, window_s=1.0))
    fast = replay(workload, ReplaySettings.recorded(workload, max_rpm=240, window_s=1.0))
    assert slow.figures.makespan_s == pytest.approx(5 * 1.5 + 0.5, abs=0.01)
    assert fast.figures.makespan_s == pytest.approx(2 * 1.5 + 0.5, abs=0.01)


def test_tpm_gate_reserves_the_estimate_and_reconciles_to_real_usage() -> None:
    # Each call reserves 100 + 1024 tokens; TPM 2,400 per 1 s window admits 2 at a time. An
    # answered call's reservation shrinks to input + output = 150: the first reconciliation
    # (at 0.5 s) makes room for the third call, the fourth fits when the third is answered.
    rec = Recording()
    for _ in range(4):
        rec.call(0.0, [{"latency": 0.5}])
    workload = rec.workload()
    result = replay(workload, ReplaySettings.recorded(workload, max_tpm=2_400 * 60, window_s=1.0))
    sends = sorted(result.run.first_sent)
    assert sends == pytest.approx([0.0, 0.0, 0.5, 1.0], abs=0.01)
    assert result.figures.gate_wait_s["tpm"]["mean"] == pytest.approx(0.375, abs=0.01)


def test_a_call_larger_than_the_tpm_window_fails_as_too_large() -> None:
    rec = Recording()
    rec.call(0.0, reserved=5_000)
    rec.call(0.0, reserved=100)
    workload = rec.workload()
    result = replay(workload, ReplaySettings.recorded(workload, max_tpm=1_000, window_s=60.0))
    assert sorted(result.run.outcome) == ["failed", "succeeded"]
    assert "too_large" in result.run.error_type
    assert result.figures.requests == 1


def test_recorded_failures_and_retry_waits_replay_as_recorded() -> None:
    rec = Recording()
    rec.call(
        0.0,
        [
            {"latency": 0.2, "error": "rate_limited", "retry_after": 2.0, "wait": 2.0},
            {"latency": 0.3, "error": "server_error", "status": 500, "wait": 0.5},
            {"latency": 1.0},
        ],
    )
    rec.call(0.0, [{"latency": 0.4, "error": "bad_request", "status": 400}])
    workload = rec.workload()
    result = replay(workload)
    f = result.figures
    assert f.requests == 4
    assert f.rate_limited == 1  # replayed as recorded
    assert sorted(result.run.finished) == pytest.approx([0.4, 0.2 + 2.0 + 0.3 + 0.5 + 1.0])
    assert sorted(result.run.outcome) == ["failed", "succeeded"]


def test_a_refused_connection_gives_its_rpm_slot_back() -> None:
    # capacity 1 per 10 s window: the refused first attempt must not hold the only slot, or
    # the retry and the next call would wait 10 s.
    rec = Recording()
    rec.call(0.0, [{"latency": 0.1, "error": "connection", "refused": True, "wait": 0.1}, {}])
    workload = rec.workload()
    result = replay(workload, ReplaySettings.recorded(workload, max_rpm=6, window_s=10.0))
    assert result.figures.makespan_s == pytest.approx(0.1 + 0.1 + 1.0, abs=0.01)


def test_traffic_scale_by_time_compression_divides_arrival_times() -> None:
    rec = Recording()
    for i in range(10):
        rec.call(i * 2.0)
    workload = rec.workload()
    settings = ReplaySettings.recorded(workload, scale=4.0)
    assert [at for at, _ in scaled_calls(workload, settings)] == [i * 0.5 for i in range(10)]
    result = replay(workload, settings)
    assert result.figures.calls == 10
    assert result.figures.makespan_s == pytest.approx(4.5 + 1.0)


def test_traffic_scale_by_resampling_keeps_the_span_and_is_seeded() -> None:
    rec = Recording()
    for i in range(50):
        rec.call(i * 1.0, [{"latency": 1.0 + i / 100}])
    workload = rec.workload()
    settings = ReplaySettings.recorded(workload, scale=3.0, scale_method="resample", seed=7)
    plan = scaled_calls(workload, settings)
    assert len(plan) == 150
    arrivals = [at for at, _ in plan]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] >= 0.0 and arrivals[-1] <= 49.0
    # The profile is kept: about a third of the calls in each third of the span.
    thirds = [sum(1 for a in arrivals if k * 49 / 3 <= a < (k + 1) * 49 / 3) for k in range(3)]
    assert all(30 <= n <= 70 for n in thirds), thirds
    assert scaled_calls(workload, settings) == plan  # same seed, same draw
    assert scaled_calls(workload, settings.with_(seed=8)) != plan


def test_provider_model_answers_429_over_its_limit_and_the_retry_policy_waits() -> None:
    # The provider takes 2 per 1 s window, our gates are off: of 6 calls at t=0, 4 get a
    # 429 with a retry-after, retry when told, and the model counts each request on arrival.
    workload = burst(6, latency=0.5)
    settings = ReplaySettings.recorded(
        workload, provider_rpm=120, provider_window_s=1.0, provider_429_latency_s=0.0
    )
    result = replay(workload, settings)
    f = result.figures
    assert f.rate_limited >= 4
    assert f.succeeded + f.failed == 6
    assert f.requests == 6 + f.rate_limited
    # Nobody succeeds before the provider's window lets it in: 2 per second at most.
    run = result.run
    done = sorted(t for t, o in zip(run.finished, run.outcome, strict=True) if o == "succeeded")
    for i, t in enumerate(done):
        assert t >= (i // 2) * 1.0 + 0.5 - 1e-6


def test_provider_model_counts_every_arrival_and_gives_each_429_its_own_retry_after() -> None:
    model = ProviderModel(rpm=120, tpm=600, window_s=1.0)  # 2 requests, 10 tokens per second
    for t in (0.0, 0.1):
        assert model.check(t, 4) == (True, None)
        model.count(t, 4)
    # Full: each refused request counts too, so each is told a later time than the one before
    # it (the slots free at 1.0, 1.1, then the refused ones' own at 1.2 ...).
    retry_afters = [model.check(t, 1) for t in (0.2, 0.3, 0.35)]
    assert [ok for ok, _ in retry_afters] == [False] * 3
    told = [
        round(t + (r or 0), 6) for t, (_, r) in zip((0.2, 0.3, 0.35), retry_afters, strict=True)
    ]
    assert told == [1.0, 1.1, 1.2]
    assert model.check(1.05, 20) == (False, None)  # larger than the window: never fits
    remaining_requests, remaining_tokens, reset = model.headers(1.05)
    assert (remaining_requests, remaining_tokens) == (0, 6)  # 4 counted, 1 of them with tokens
    assert reset == pytest.approx(0.3)
    # A provider that does not count refusals tells them all the same time.
    lenient = ProviderModel(rpm=120, tpm=None, window_s=1.0, counts_rejected=False)
    lenient.count(0.0, 0)
    lenient.count(0.1, 0)
    assert {round(t + lenient.check(t, 1)[1], 6) for t in (0.2, 0.3, 0.35)} == {1.0}  # type: ignore[operator]


def _faulty(n: int = 200, **limits: Any) -> Any:
    """``n`` calls 0.1 s apart; every 5th first got a 500 and was retried (recorded
    max_attempts 3), every 10th (offset) first got a 429 with room left (not the limit)."""
    rec = Recording(**limits)
    room = {"x-ratelimit-remaining-requests": "50", "x-ratelimit-limit-requests": "6000"}
    for i in range(n):
        attempts: list[dict[str, Any]] = [{"latency": 0.5}]
        if i % 5 == 0:
            attempts.insert(
                0, {"latency": 0.2, "error": "server_error", "status": 500, "wait": 0.3}
            )
        elif i % 10 == 3:
            attempts.insert(
                0,
                {
                    "latency": 0.01,
                    "error": "rate_limited",
                    "retry_after": 0.1,
                    "wait": 0.1,
                    "headers": room,
                },
            )
        rec.call(i * 0.1, attempts)
    return rec.workload()


def test_the_fault_model_keeps_recorded_errors_and_injected_429s_at_their_share() -> None:
    workload = _faulty()
    faults = FaultModel(workload, limit_429s=False)
    # 200 answers + 40 500s + 20 429s reached the provider.
    assert faults.reached == 260
    shares: dict[str, tuple[Any, ...]] = {
        f.error_type: (share, f.status, f.latency_s, f.retry_after_s) for share, f in faults.faults
    }
    assert shares["server_error"] == (pytest.approx(40 / 260), 500, pytest.approx(0.2), None)
    assert shares["rate_limited"] == (pytest.approx(20 / 260), 429, pytest.approx(0.01), 0.1)
    assert faults.draw(0.0) is not None and faults.draw(0.999) is None


def test_max_attempts_is_a_knob_and_retries_are_drawn_not_scripted() -> None:
    workload = _faulty()
    once = replay(workload, ReplaySettings.recorded(workload, max_attempts=1)).figures
    thrice = replay(workload, ReplaySettings.recorded(workload, max_attempts=3)).figures
    # One attempt: about 60 / 260 of the calls fail (binomial, seeded: well inside 25-70).
    assert 25 <= once.failed <= 70
    assert set(once.failures_by_type) == {"server_error", "rate_limited"}
    assert once.requests == 200
    # Three attempts: a call fails only if all three do (0.23^3 x 200 ~ 2.5).
    assert thrice.failed <= 8
    assert thrice.requests > 200 + 25
    # The recorded scripts alone could not do it: replayed as recorded, nothing fails.
    assert replay(workload).figures.failed == 0


def test_calls_that_only_got_429s_are_failures() -> None:
    # The provider takes 2 per 1 s window; one attempt each: 4 of 6 calls get only a 429.
    workload = burst(6, latency=0.5)
    settings = ReplaySettings.recorded(
        workload, provider_rpm=120, provider_window_s=1.0, max_attempts=1
    )
    f = replay(workload, settings).figures
    assert (f.succeeded, f.failed) == (2, 4)
    assert f.failures_by_type == {"rate_limited": 4}
    assert f.rate_limited == 4 and f.rate_limited_share == pytest.approx(4 / 6)


def test_the_provider_model_turns_on_when_the_gate_is_looser_than_the_stated_limit() -> None:
    stated = {"x-ratelimit-limit-requests": "120", "x-ratelimit-reset-requests": "0.98s"}
    rec = Recording(max_rpm=120, window_s=1.0)
    for i in range(8):
        rec.call(i * 0.5, [{"latency": 0.3, "headers": stated}])
    workload = rec.workload()
    same, notes = provider_defaults(workload, ReplaySettings.recorded(workload))
    assert not same.provider_model and notes == []
    loose, notes = provider_defaults(workload, ReplaySettings.recorded(workload, max_rpm=None))
    assert (loose.provider_rpm, loose.provider_window_s) == (120, 1.0)
    assert len(notes) == 1 and "provider model ON" in notes[0] and "max_rpm=None" in notes[0]
    # Without stated limits it says so rather than assume silently.
    bare = Recording(max_rpm=120, window_s=1.0)
    bare.call(0.0)
    workload = bare.workload()
    kept, notes = provider_defaults(workload, ReplaySettings.recorded(workload, max_rpm=None))
    assert not kept.provider_model
    assert (
        len(notes) == 1 and "states no provider limit" in notes[0] and "--provider-rpm" in notes[0]
    )


async def test_the_write_ahead_of_sent_holds_the_permit_and_counts_as_client_time(
    store_url: str,
) -> None:
    # One permit, ten calls at once: each waits 10 ms for its `sent` event to be committed
    # (holding the permit) before its 0.1 s attempt starts.
    rec = Recording(max_concurrent_requests=1)
    for _ in range(10):
        rec.call(0.0, [{"latency": 0.1, "processing": 0.1, "pre_send": 0.01}])
    await write(store_url, rec.events)
    for workload in (rec.workload(), await load(store_url)):
        assert [c.attempts[0].pre_send_s for c in workload.calls] == [pytest.approx(0.01)] * 10
        figures = (await replay_async(workload, ReplaySettings.recorded(workload))).figures
        assert figures.makespan_s == pytest.approx(1.1)
    # The client's time includes it: 10 ms per attempt (of CPU and queueing, M/D/1), at 10
    # attempts in the recorded 0.11 s.
    c = calibrated_client_cpu(workload)
    rate = 10 / 0.11
    assert c is not None
    assert c + rate * c * c / (2 * (1 - rate * c)) == pytest.approx(0.01, rel=1e-4)


def test_time_a_gate_held_a_request_at_the_wire_is_neither_replayed_nor_client_cpu() -> None:
    # Every call: 2 ms to write its body, 0.1 s of provider, 4 ms to read the answer. Half of
    # them waited at the RPM gate, which granted ahead and held them 50 ms at the wire: that
    # hold is in their recorded latency (it counts from `sent`), before the body's write.
    def recording(held: float) -> Recording:
        rec = Recording()
        for i in range(100):
            hold = held if i % 2 else 0.0
            attempt = {"body_sent": 0.002 + hold, "first_byte": 0.102 + hold}
            rec.call(i * 0.01, [{"latency": 0.106 + hold, **attempt}], rpm_wait=hold)
        return rec

    plain, held = recording(0.0).workload(), recording(0.05).workload()
    # (Within 2%: the last call finishes 50 ms later, so the recorded rate is a little lower.)
    assert calibrated_client_cpu(held) == pytest.approx(calibrated_client_cpu(plain), rel=0.02)
    # Replayed without a gate, nothing holds them: every call takes 0.106 s.
    for workload in (plain, held):
        figures = replay(workload, ReplaySettings.recorded(workload)).figures
        assert figures.total_latency_s["p99"] == pytest.approx(0.106)


def test_client_cpu_is_calibrated_and_queues_one_attempt_at_a_time() -> None:
    # 100 attempts in 1.0975 s, each 7.5 ms longer than the provider's own time: CPU time c
    # plus the M/D/1 mean wait behind the others, W = c + rate c^2 / (2 (1 - rate c)).
    rec = Recording()
    for i in range(100):
        rec.call(i * 0.01, [{"latency": 0.1075, "processing": 0.1}])
    c = calibrated_client_cpu(rec.workload())
    assert c is not None
    rate = 100 / (0.99 + 0.1075)
    assert 0 < c < 0.0075
    assert c + rate * c * c / (2 * (1 - rate * c)) == pytest.approx(0.0075)
    rec = Recording()
    for _ in range(10):  # recorded: 0.15 s each, of which the provider's own time is 0.1 s
        rec.call(0.0, [{"latency": 0.15, "processing": 0.1}])
    workload = rec.workload()
    run = replay(workload, ReplaySettings.recorded(workload, client_cpu_s=0.01)).run
    # Ten calls share one client: the k-th is sent after k x 10 ms, answered 0.1 s later.
    assert sorted(run.finished) == pytest.approx([0.01 * k + 0.1 for k in range(1, 11)])
    # Off (the default): recorded latencies, provider and client time together.
    assert replay(workload).run.finished == pytest.approx([0.15] * 10)


def test_cost_is_priced_on_real_tokens_and_unpriced_models_are_counted() -> None:
    rec = Recording()
    rec.call(0.0, input_tokens=1_000_000, output_tokens=1_000_000)
    rec.call(0.0, model="house-model-7b")
    workload = rec.workload()
    f = replay(workload).figures
    price = PriceTable.default().price("gpt-4o-mini")
    assert price is not None
    assert f.cost_usd == price.input + price.output
    assert f.unpriced_calls == 1
    assert isinstance(f.cost_usd, Decimal)


def test_a_retry_waits_for_its_rpm_slot_without_holding_a_permit() -> None:
    # One permit, two RPM slots per minute, three calls at t=0; the first fails once. Its retry
    # needs a third slot, while the third call, queued at the gate first, takes the first slot
    # that frees (at 0.1 s + one window): FIFO. Since a permit is only taken after the slot,
    # the second call runs meanwhile and nobody waits for anybody forever.
    rec = Recording()
    fails_once = [{"latency": 0.1, "error": "server_error", "status": 500, "wait": 0.1}]
    rec.call(0.0, [*fails_once, {"latency": 0.1}])
    rec.call(0.0, [{"latency": 0.1}])
    rec.call(0.0, [{"latency": 0.1}])
    workload = rec.workload()
    settings = ReplaySettings.recorded(workload, max_rpm=2, max_concurrent_requests=1)
    result = replay(workload, settings)
    first, second, third = result.run.finished
    assert second == pytest.approx(0.2, abs=0.01)  # its permit came when the 500 came back
    assert third == pytest.approx(60.1 + 0.1, abs=0.01)  # the first slot, a window later
    assert first == pytest.approx(60.2 + 0.1, abs=0.01)  # the second slot, then its answer
    assert result.run.outcome == ["succeeded"] * 3
    assert result.figures.gate_wait_s["rpm"]["p95"] > 59


def test_invalid_knobs_are_rejected_with_the_fix() -> None:
    workload = burst(1)
    with pytest.raises(ValueError, match="max_rpm=0 is invalid"):
        ReplaySettings.recorded(workload, max_rpm=0)
    with pytest.raises(ValueError, match="scale_method"):
        ReplaySettings.recorded(workload, scale_method="stretch")
    with pytest.raises(ValueError, match="unknown replay setting"):
        ReplaySettings.recorded(workload, max_rps=3)

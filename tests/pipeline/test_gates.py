"""Sliding-window gate and FIFO semaphore, on a manual clock (no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from llmtrail.pipeline import ConfigurationError, FairSemaphore, ManualClock, SlidingWindowGate
from llmtrail.pipeline._gates import GateRequestTooLarge, parse_reset


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make_gate(
    capacity: int = 3, window: float = 1.0, guard: float = 0.0
) -> tuple[SlidingWindowGate, ManualClock]:
    clock = ManualClock()
    return SlidingWindowGate("rpm", capacity, window, clock=clock, send_guard_s=guard), clock


async def test_check_and_reserve_is_atomic_under_concurrent_callers() -> None:
    gate, _ = make_gate(capacity=3)
    tasks = [asyncio.create_task(gate.acquire(1)) for _ in range(5)]
    await settle()
    assert sum(t.done() for t in tasks) == 3
    assert gate.used() == 3
    assert gate.waiting() == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_waiters_are_served_in_arrival_order() -> None:
    gate, clock = make_gate(capacity=1)
    first = await gate.acquire(1)
    gate.mark_sent(first)
    order: list[int] = []

    async def waiter(i: int) -> None:
        res = await gate.acquire(1)
        order.append(i)
        gate.mark_sent(res)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await settle()
    for _ in range(4):
        clock.advance(1.01)
        await settle()
    assert order == [0, 1, 2, 3]
    await asyncio.gather(*tasks)


async def test_pending_reservation_never_expires_until_sent() -> None:
    gate, clock = make_gate(capacity=1, window=1.0)
    res = await gate.acquire(1)
    blocked = asyncio.create_task(gate.acquire(1))
    clock.advance(10.0)  # far past the window: a pending slot must still count
    await settle()
    assert not blocked.done()
    gate.mark_sent(res)  # the window starts now, at t=10
    clock.advance(0.999)
    await settle()
    assert not blocked.done()
    clock.advance(0.002)
    await settle()
    assert blocked.done()


async def test_window_ends_by_send_plus_guard_while_no_answer_is_in() -> None:
    gate, clock = make_gate(capacity=1, window=1.0, guard=0.05)
    res = await gate.acquire(1)
    clock.advance(0.5)
    gate.mark_sent(res)
    assert res.expires_at == pytest.approx(0.5 + 0.05 + 1.0, abs=0.002)
    waiter = asyncio.create_task(gate.acquire(1))
    clock.advance(1.04)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)
    await settle()
    assert waiter.done()


async def test_by_default_an_attempt_in_flight_holds_its_slot_until_its_answer() -> None:
    clock = ManualClock()
    gate = SlidingWindowGate("rpm", 1, 1.0, clock=clock)  # send_guard_s=None
    res = await gate.acquire(1)
    gate.mark_sent(res)
    waiter = asyncio.create_task(gate.acquire(1))
    clock.advance(30.0)  # a slow answer: the request may have arrived late, so keep counting
    await settle()
    assert not waiter.done()
    gate.mark_done(res)  # answered at 30: it arrived by 30, its window ends by 31
    clock.advance(0.99)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)
    await settle()
    assert waiter.done()


async def test_an_attempt_without_answer_keeps_its_slot_a_guard_longer() -> None:
    clock = ManualClock()
    gate = SlidingWindowGate("rpm", 1, 1.0, clock=clock)
    res = await gate.acquire(1)
    gate.mark_sent(res)
    gate.mark_done(res, unanswered_guard_s=1.0)  # timed out: it may still arrive within 1 s
    assert res.expires_at == pytest.approx(2.0, abs=0.002)


async def test_an_answer_ends_the_window_at_answer_plus_window() -> None:
    gate, clock = make_gate(capacity=1, window=1.0, guard=0.5)
    res = await gate.acquire(1)
    gate.mark_sent(res)
    clock.advance(0.1)
    gate.mark_done(res)  # answered at 0.1: it arrived by 0.1, so its window ends by 1.1
    waiter = asyncio.create_task(gate.acquire(1))
    clock.advance(0.99)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)
    await settle()
    assert waiter.done()


async def test_a_slow_answer_never_moves_the_window_end_later() -> None:
    gate, clock = make_gate(capacity=1, window=1.0, guard=0.2)
    res = await gate.acquire(1)
    gate.mark_sent(res)
    clock.advance(0.9)  # slower than the guard: we assume it arrived by 0.2
    gate.mark_done(res)
    assert res.expires_at == pytest.approx(1.2, abs=0.002)


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    gate, clock = make_gate(capacity=1)
    held = await gate.acquire(1)
    gate.mark_sent(held)
    doomed = asyncio.create_task(gate.acquire(1))
    survivor = asyncio.create_task(gate.acquire(1))
    await settle()
    doomed.cancel()
    await settle()
    assert doomed.cancelled()
    assert gate.waiting() == 1
    clock.advance(1.01)
    await settle()
    assert survivor.done()
    assert gate.used() == 1
    assert gate.waiting() == 0


async def test_grant_racing_with_cancellation_is_given_back() -> None:
    gate, clock = make_gate(capacity=1)
    held = await gate.acquire(1)
    gate.mark_sent(held)
    task = asyncio.create_task(gate.acquire(1))
    await settle()
    clock.advance(1.01)  # grants the waiter: its future is resolved ...
    task.cancel()  # ... and the task is cancelled before it resumes
    await settle()
    assert task.cancelled()
    assert gate.used() == 0
    assert gate.reserved() == 0


async def test_release_returns_units_and_wakes_the_head() -> None:
    gate, _ = make_gate(capacity=2)
    a = await gate.acquire(2)
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    gate.release(a)
    await settle()
    assert waiter.done()
    assert gate.used() == 1


async def test_reconcile_replaces_the_estimate_with_the_real_count() -> None:
    gate, _ = make_gate(capacity=1000)
    res = await gate.acquire(600)
    gate.mark_sent(res)
    waiter = asyncio.create_task(gate.acquire(500))
    await settle()
    assert not waiter.done()
    gate.reconcile(res, 450)
    await settle()
    assert waiter.done()
    assert gate.used() == 950


async def test_a_request_larger_than_the_window_fails_fast_with_a_fix() -> None:
    gate, _ = make_gate(capacity=100)
    with pytest.raises(GateRequestTooLarge, match="never be admitted"):
        await gate.acquire(101)


async def test_gate_believes_the_provider_when_it_reports_less_room() -> None:
    gate, clock = make_gate(capacity=10)
    gate.observe_provider(remaining=0, reset_s=2.0)
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(2.01)
    await settle()
    assert waiter.done()


async def test_provider_report_with_more_room_is_ignored() -> None:
    gate, _ = make_gate(capacity=2)
    gate.observe_provider(remaining=100, reset_s=1.0)
    await gate.acquire(2)
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_preload_counts_recent_sends_until_they_age_out() -> None:
    gate, clock = make_gate(capacity=2, window=1.0)
    assert gate.preload([(0.5, 1), (0.2, 1), (5.0, 1)], guard_s=0.0) == 2
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(0.51)
    await settle()
    assert waiter.done()


def test_invalid_capacity_names_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="at least 1 per window"):
        SlidingWindowGate("rpm", 0, 1.0, clock=ManualClock())


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("", None)],
)
def test_parse_reset_reads_openai_durations(raw: str, seconds: float | None) -> None:
    assert parse_reset(raw) == (pytest.approx(seconds) if seconds is not None else None)


async def test_semaphore_is_fifo_and_counts_holders() -> None:
    sem = FairSemaphore(1)
    await sem.acquire()
    order: list[int] = []

    async def worker(i: int) -> None:
        await sem.acquire()
        order.append(i)
        sem.release()

    tasks = [asyncio.create_task(worker(i)) for i in range(3)]
    await settle()
    assert sem.waiting() == 3
    assert sem.in_flight() == 1
    sem.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert sem.in_flight() == 0


async def test_semaphore_cancellation_never_leaks_a_permit() -> None:
    sem = FairSemaphore(1)
    await sem.acquire()
    queued = asyncio.create_task(sem.acquire())
    await settle()
    sem.release()  # hands the permit to `queued` ...
    queued.cancel()  # ... which is cancelled before it resumes
    await settle()
    assert queued.cancelled()
    assert sem.in_flight() == 0
    assert sem.waiting() == 0


def test_semaphore_rejects_zero_concurrency() -> None:
    with pytest.raises(ConfigurationError, match="max_concurrent_requests=0"):
        FairSemaphore(0)


async def test_a_provider_deficit_is_held_back_while_our_own_units_still_expire() -> None:
    gate, clock = make_gate(capacity=10, window=1.0, guard=0.0)
    ours = [await gate.acquire(1) for _ in range(2)]
    for res in ours:
        gate.mark_sent(res)
    gate.observe_provider(remaining=3, reset_s=5.0)  # the provider counts 5 more than we do
    granted = [await gate.acquire(1) for _ in range(3)]
    assert len(granted) == 3
    blocked = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not blocked.done()
    clock.advance(1.01)  # our first two units expire; the deficit is still held back
    await settle()
    assert blocked.done()
    assert gate.used() == 4


async def test_the_sent_log_holds_only_what_can_still_expire() -> None:
    clock = ManualClock()
    gate = SlidingWindowGate("rpm", 1_000_000, 1.0, clock=clock)
    for _ in range(5_000):
        res = await gate.acquire(1)
        gate.mark_sent(res)
        clock.advance(0.01)
        gate.mark_done(res)
    assert gate.used() <= 101  # one window of 10 ms calls
    assert len(gate._log) <= 2 * gate.used() + 1  # no stale entry per call piles up

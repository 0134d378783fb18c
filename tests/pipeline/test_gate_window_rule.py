"""The send-time window rule and the provider's corrections, on a manual clock (no sleeping).

A slot's window ends at ``min(answer, body_sent + arrival_guard_s, no answer: end +
unanswered_guard_s) + window``; the provider's ``remaining`` headers correct the view both ways.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from llmtrail.pipeline import ManualClock, SlidingWindowGate
from llmtrail.pipeline._gates import GateReservation, provider_count

W = 1.0  # window
GUARD = 0.05  # arrival_guard_s


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make_gate(capacity: int = 1) -> tuple[SlidingWindowGate, ManualClock]:
    clock = ManualClock()
    return SlidingWindowGate("rpm", capacity, W, clock=clock), clock


async def sent_at(gate: SlidingWindowGate, clock: ManualClock, t: float) -> GateReservation:
    """Acquire one unit and hand it to the SDK at time ``t``."""
    res = await gate.acquire(1)
    clock.advance(t - clock.now())
    gate.mark_sent(res)
    return res


async def admitted_at(gate: SlidingWindowGate, clock: ManualClock) -> float:
    """Move time in 1 ms steps until a new waiter is admitted; return that time."""
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    for _ in range(10_000):
        if waiter.done():
            return clock.now()
        clock.advance(0.001)
        await settle()
    raise AssertionError("never admitted")


async def test_an_answer_before_the_guard_ends_the_window_one_window_after_the_answer() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    clock.advance(0.1)
    gate.mark_arrived(res, clock.now() + GUARD)  # body written at 0.1: arrived by 0.15
    clock.advance(0.02)
    gate.mark_done(res)  # answered at 0.12, before the guard ran out
    assert res.expires_at == pytest.approx(0.12 + W, abs=0.002)
    assert await admitted_at(gate, clock) == pytest.approx(0.12 + W, abs=0.003)


async def test_an_answer_after_the_guard_leaves_the_window_at_body_sent_plus_guard() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    clock.advance(0.1)
    gate.mark_arrived(res, clock.now() + GUARD)
    clock.advance(0.4)
    gate.mark_done(res)  # answered at 0.5: the window still starts at 0.15
    assert res.expires_at == pytest.approx(0.15 + W, abs=0.002)
    assert await admitted_at(gate, clock) == pytest.approx(0.15 + W, abs=0.003)


async def test_a_long_call_frees_its_slot_before_its_answer_comes() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    gate.mark_arrived(res, 0.01 + GUARD)
    # No answer yet at 1.06 + a little: the slot is free all the same.
    assert await admitted_at(gate, clock) == pytest.approx(0.06 + W, abs=0.003)
    assert res.done


async def test_without_the_hook_the_window_starts_at_the_answer() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    waiter = asyncio.create_task(gate.acquire(1))
    clock.advance(5.0)  # in flight, no hook: the slot never expires on its own
    await settle()
    assert not waiter.done()
    gate.mark_done(res)  # answered at 5.0
    assert res.expires_at == pytest.approx(5.0 + W, abs=0.002)
    clock.advance(W - 0.01)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)
    await settle()
    assert waiter.done()


async def test_cancellation_between_send_and_answer_keeps_the_send_time_bound() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    clock.advance(0.1)
    gate.mark_arrived(res, clock.now() + GUARD)
    clock.advance(0.2)
    gate.mark_done(res, unanswered_guard_s=1.0)  # cancelled at 0.3: no answer
    assert res.expires_at == pytest.approx(0.15 + W, abs=0.002)


async def test_cancellation_before_the_body_was_written_adds_the_unanswered_guard() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    clock.advance(0.3)
    gate.mark_done(res, unanswered_guard_s=1.0)  # no hook fired, no answer
    assert res.expires_at == pytest.approx(0.3 + 1.0 + W, abs=0.002)


async def test_a_later_bound_never_moves_a_window_end_later() -> None:
    gate, clock = make_gate()
    res = await sent_at(gate, clock, 0.0)
    gate.mark_done(res)  # answered at 0.0
    gate.mark_arrived(res, 0.5)  # a late hook call
    assert res.expires_at == pytest.approx(W, abs=0.002)


def test_provider_count_scales_the_per_minute_limit_to_the_window() -> None:
    assert provider_count(1_200, 5, 1.0) == 15  # 20 per 1 s window, 5 left
    assert provider_count(1_200, 50, 1.0) < 0  # a window unlike ours: ignored by the gate


async def full_gate_with_a_waiter(
    capacity: int = 4,
) -> tuple[SlidingWindowGate, ManualClock, asyncio.Task[GateReservation]]:
    """``capacity`` units sent at 0 and arrived by 0.01; one waiter queued."""
    gate, clock = make_gate(capacity)
    for _ in range(capacity):
        res = await sent_at(gate, clock, 0.0)
        gate.mark_arrived(res, 0.01)
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(0.5)
    return gate, clock, waiter


async def test_a_provider_with_more_room_frees_units_that_certainly_arrived() -> None:
    gate, clock, waiter = await full_gate_with_a_waiter(4)
    # A per-minute limit of 240 is 4 per 1 s window; 2 remain: the provider counts 2 of our 4.
    gate.observe_provider(2, 0.5, as_of=0.4, limit=240)
    await settle()
    assert waiter.done()
    assert gate.used() == 3  # two freed, the waiter's one taken


async def test_more_room_frees_only_units_that_arrived_before_the_report() -> None:
    gate, clock, waiter = await full_gate_with_a_waiter(4)
    # The report was made after 0.005 only: our units may have arrived later than that (their
    # bound is 0.01), so the provider's count says nothing about them.
    gate.observe_provider(2, 0.5, as_of=0.005, limit=240)
    await settle()
    assert not waiter.done()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_more_room_needs_the_provider_limit_and_the_send_time() -> None:
    gate, clock, waiter = await full_gate_with_a_waiter(4)
    gate.observe_provider(2, 0.5)  # older callers: no as_of, no limit
    gate.observe_provider(2, 0.5, as_of=0.4)  # no limit: the provider's count is unknown
    gate.observe_provider(2, 0.5, limit=240)  # no as_of: which units it counted is unknown
    await settle()
    assert not waiter.done()
    assert gate.used() == 4
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_more_room_never_frees_more_than_the_provider_let_go() -> None:
    gate, clock, waiter = await full_gate_with_a_waiter(4)
    # 1,000 per window at the provider but 2,000 remaining: not the gate's window, ignored.
    gate.observe_provider(2_000, 0.5, as_of=0.4, limit=60_000)
    assert gate.used() == 4
    gate.observe_provider(3, 0.5, as_of=0.4, limit=240)  # counts 1 of our 4: frees 3
    await settle()
    assert waiter.done()
    assert gate.used() == 2


async def test_a_merely_late_report_is_not_less_room() -> None:
    gate, clock = make_gate(2)
    res = await sent_at(gate, clock, 0.0)
    gate.mark_done(res)  # ends at 1.0
    clock.advance(1.2)
    assert gate.used() == 0
    # Made at 0.9 (after the send at 0.8 of the attempt it answers), read at 1.2: it still
    # counted our unit that ended at 1.0. That is not someone else's usage.
    gate.observe_provider(1, 0.5, as_of=0.8, limit=120)
    both = asyncio.gather(gate.acquire(1), gate.acquire(1))
    await settle()
    assert both.done()


async def test_a_grant_ahead_carries_the_moment_its_units_fit() -> None:
    gate, clock = make_gate(2)
    first = await sent_at(gate, clock, 0.0)
    gate.mark_arrived(first, 0.0)  # ends at 1.0
    second = await sent_at(gate, clock, 0.5)
    gate.mark_arrived(second, 0.5)  # ends at 1.5
    clock.advance(0.45)  # 0.95: full, the first unit frees at 1.0
    gate.lead_s = 0.1
    early = await gate.acquire(1)
    assert early.not_before == pytest.approx(1.0, abs=0.002)  # granted ahead, held till then
    # The next one fits only at 1.5, beyond the lead: it waits, and is granted at 1.4.
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(0.44)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)  # 1.41
    await settle()
    assert waiter.done()
    assert waiter.result().not_before == pytest.approx(1.5, abs=0.002)


async def test_without_a_lead_nothing_is_granted_before_it_fits() -> None:
    gate, clock = make_gate(1)
    res = await sent_at(gate, clock, 0.0)
    gate.mark_arrived(res, 0.0)
    clock.advance(0.95)
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(0.06)
    await settle()
    assert waiter.result().not_before == -math.inf  # fits now: no hold


async def test_no_grant_ahead_while_the_provider_deficit_holds() -> None:
    gate, clock = make_gate(2)
    gate.observe_provider(1, 0.5)  # someone else holds 1 until 0.5
    await gate.acquire(1)
    gate.lead_s = 1.0
    waiter = asyncio.create_task(gate.acquire(1))
    await settle()
    assert not waiter.done()
    clock.advance(0.51)
    await settle()
    assert waiter.done()

"""The gate-facing steps of one HTTP attempt: when its request may leave (a grant ahead holds
it at the wire), when it certainly arrived (the send-time rule), and what the provider's
rate-limit headers say about the window.

Invariants:
- A slot's window ends at most one window after ``body written + arrival_guard_s`` once the
  transport reported the write (:func:`mark_arrived`); the answer (``mark_done``) can only
  end it sooner.
- A provider report is compared with the attempt's hand-off time (``as_of``), which is
  certainly earlier than the provider's view; the body-written reading may not be.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Literal

from ._call import CallState, CallStream, to_int
from ._events import EventType
from ._gates import GateReservation, SlidingWindowGate, parse_reset
from ._payloads import unmarked
from ._redis_gates import RedisSlidingWindowGate, create_gate
from ._settings import Limits
from .typing import Clock, UsageHistory

__all__ = [
    "AnyGate",
    "build_gates",
    "gate_capacity",
    "give_back",
    "hold_for",
    "mark_arrived",
    "observe_headers",
    "warm_gates",
]

AnyGate = SlidingWindowGate | RedisSlidingWindowGate


def hold_for(clock: Clock, state: CallState) -> Callable[[], Awaitable[None]] | None:
    """Waits until the attempt's slots may be used, when a gate granted them ahead."""
    not_before = max(
        (r.not_before for r in (state.rpm_res, state.tpm_res) if r is not None),
        default=-math.inf,
    )
    if not_before <= clock.now():
        return None

    async def hold() -> None:
        await clock.sleep(not_before - clock.now())

    return hold


def mark_arrived(rpm: AnyGate | None, tpm: AnyGate | None, state: CallState, by: float) -> None:
    """The attempt's request reached the provider by ``by``: its slots' windows end then."""
    if state.rpm_res is not None and rpm is not None:
        rpm.mark_arrived(state.rpm_res, by)
    if state.tpm_res is not None and tpm is not None:
        tpm.mark_arrived(state.tpm_res, by)


def observe_headers(
    rpm: AnyGate | None, tpm: AnyGate | None, rate_limits: Mapping[str, str], as_of: float
) -> None:
    """The provider's view (its ``x-ratelimit-*`` headers), made after ``as_of``: corrects the
    gates both ways.

    ``as_of`` is when the attempt was handed to the SDK, not when its body was written: the
    hook reads the time *after* the write, and the provider may have answered before that,
    so only the hand-off is certainly earlier than the provider's report.
    """
    if not rate_limits:
        return
    if rpm is not None:
        rpm.observe_provider(
            to_int(rate_limits.get("x-ratelimit-remaining-requests")),
            parse_reset(rate_limits.get("x-ratelimit-reset-requests")),
            as_of=as_of,
            limit=to_int(rate_limits.get("x-ratelimit-limit-requests")),
        )
    if tpm is not None:
        tpm.observe_provider(
            to_int(rate_limits.get("x-ratelimit-remaining-tokens")),
            parse_reset(rate_limits.get("x-ratelimit-reset-tokens")),
            as_of=as_of,
            limit=to_int(rate_limits.get("x-ratelimit-limit-tokens")),
        )


def give_back(
    rpm: AnyGate | None, tpm: AnyGate | None, call: CallStream, state: CallState, reason: str
) -> None:
    """Return the reservations the provider never counted, each with an ``unmarked`` event.

    Pending ones (never sent) always; sent ones only when no attempt reached the provider
    (every connection was refused). Anything that may have arrived stays counted.
    """
    never_arrived = reason == "connection_refused" and not state.reached
    held: tuple[tuple[Literal["rpm", "tpm"], AnyGate | None, GateReservation | None], ...] = (
        ("rpm", rpm, state.rpm_res),
        ("tpm", tpm, state.tpm_res),
    )
    for gate_name, gate, res in held:
        if gate is None or res is None or res.done:
            continue
        if res.pending or never_arrived:
            amount = res.amount
            gate.release(res)
            attempt = max(state.attempts, 1)
            call.emit(EventType.UNMARKED, unmarked(gate_name, attempt, amount, reason))


def gate_capacity(limit_per_minute: int, window_s: float) -> int:
    """A gate's capacity per sliding window: ``limit x window / 60``, floored."""
    # The epsilon keeps 240 * 1 / 60 from flooring to 3 through float error.
    return math.floor(limit_per_minute * window_s / 60.0 + 1e-9)


def build_gates(
    limits: Limits,
    clock: Clock,
    *,
    rate_limit_url: str | None,
    key: str,
    fallback: str,
    replicas: int,
) -> tuple[AnyGate | None, AnyGate | None]:
    """The RPM and TPM gates of ``limits`` (None where there is no limit): capacity per window
    = limit x window / 60, in process or shared through Redis at ``rate_limit_url``."""
    gates: list[AnyGate | None] = []
    for name, limit in (("rpm", limits.max_rpm), ("tpm", limits.max_tpm)):
        gates.append(
            create_gate(
                name,
                gate_capacity(limit, limits.rpm_window_seconds),
                float(limits.rpm_window_seconds),
                clock=clock,
                send_guard_s=limits.send_guard_s,
                rate_limit_url=rate_limit_url,
                key=key,
                fallback=fallback,
                replicas=replicas,
            )
            if limit
            else None
        )
    return gates[0], gates[1]


async def warm_gates(
    rpm: AnyGate | None, tpm: AnyGate | None, window_s: float, history: UsageHistory
) -> int:
    """Preload the gates with the sends of the last window that the store remembers (a
    restarted process then does not burst into the provider's window); how many."""
    if rpm is None and tpm is None:
        return 0
    now = datetime.now(UTC)
    sends = await history.recent_sends(now - timedelta(seconds=window_s + 1))
    ages = [((now - at).total_seconds(), tokens) for at, tokens in sends]
    if rpm is not None:
        rpm.preload((age, 1) for age, _ in ages)
    if tpm is not None:
        tpm.preload(ages)
    return len(ages)

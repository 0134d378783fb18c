"""Capacity analysis by replay: recorded traffic re-run on a virtual clock.

The simulation runs every recorded call through the production :class:`~pipeline.SlidingWindowGate`
(RPM and TPM) and :class:`~pipeline.FairSemaphore`, on a :class:`~pipeline.VirtualTimeLoop`:
the gates' default :class:`~pipeline.LoopClock` reads that loop's time, so their timers fire in
order and instantly, and there is no second implementation of the rate logic. Each call follows
the service's order (``pipeline/_flow.py``): RPM gate reserves 1 -> TPM gate reserves the
recorded ``reserved_tokens`` -> semaphore -> per attempt: RPM gate again for attempts > 1,
``mark_sent`` on both reservations, the recorded provider latency, ``mark_done`` (the windows
end one window after the answer, or ``unanswered_guard_s`` later without an HTTP answer), the
retry wait -> semaphore released -> TPM reconciled to ``input + (max_output_tokens or
output)`` for an answered call, or the reservations the provider never counted given back.

What the replay does not model: the client's own CPU time. Provider latency is replayed as it
was measured (send to answer, so it includes the client's HTTP work under the recorded load);
the work between answers and sends is taken as free. A client that is itself saturated is
therefore predicted a little faster than it runs.

A combination under which the calls end up waiting for each other (the semaphore's holders
wait at the RPM gate to retry while queued calls hold its slots as unsent reservations) stalls
the virtual loop; :func:`replay` raises :class:`ReplayStalledError` saying who holds what,
because the production pipeline would hang the same way.

What is replayed, and how:
- **Provider model off (default).** Each attempt takes its recorded latency and outcome; after a
  failed attempt the call waits the recorded retry wait and retries, or ends, as it did. Recorded
  429s and 5xx are therefore replayed as recorded (counted as ``rate_limited`` when 429).
- **Provider model on** (``provider_rpm`` and/or ``provider_tpm``). A modelled provider (a simple
  sliding window of its own, not our gate logic) counts each attempt when it arrives, charged
  ``input + (max_output_tokens or output)`` tokens, and answers 429 with a retry-after (the time
  until its window has room) when over. Recorded rate-limit 429s are dropped from the calls'
  scripts (the model decides them now); other recorded failures (5xx, timeouts, connection
  errors) still replay as recorded. The pipeline's :class:`~pipeline.RetryPolicy` decides each
  modelled 429 (retry-after, ``max_attempts``, ``max_retry_wait_s``), and every answer's
  remaining/reset figures are shown to the gates through ``observe_provider``, as production
  does with the ``x-ratelimit-*`` headers. A modelled 429 is answered after
  ``provider_429_latency_s``. A call whose every recorded attempt was a 429 has no recorded
  answer: if the model admits it, it is answered after the median recorded latency and counts
  as ``synthesized`` (no tokens, no cost).
- **Traffic scale k.** ``compress``: the same calls, arrival times divided by k (k x the rate,
  1/k the span). ``resample`` (seeded): round(k x N) calls over the same span; each new call
  draws u ~ U(0, 1), arrives at the linearly interpolated empirical arrival quantile u (so the
  rate profile over the span is kept, times k) and replays the recorded call nearest that
  quantile (so what kind of call arrives when is kept too).

Invariants:
- Nothing sleeps for real; a replay is deterministic given the workload and the settings (the
  only random draw is resampling's, seeded; a modelled 429 without retry-after falls back to
  tenacity's jittered backoff, as production does).
- ``queue length`` counts calls waiting at a gate or for the semaphore: from arrival to the
  send of attempt 1, plus the RPM waits of retries. Recorded and simulated figures are computed
  by the same function, so they compare like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal
from typing import Any

import numpy as np
from tenacity import RetryCallState

from pipeline import (
    ConfigurationError,
    ErrorType,
    FairSemaphore,
    GateRequestTooLarge,
    GateReservation,
    LLMTrailError,
    LoopClock,
    PriceTable,
    ProviderError,
    RetryPolicy,
    SlidingWindowGate,
    VirtualTimeLoop,
)

from ._workload import RecordedCall, Workload, paused_gc

__all__ = [
    "KNOBS",
    "Figures",
    "ProviderModel",
    "Replay",
    "ReplaySettings",
    "ReplayStalledError",
    "SweepRow",
    "cheapest_meeting",
    "recorded_figures",
    "replay",
    "replay_async",
    "scaled_calls",
    "sweep",
]

_RATE_LIMITED = str(ErrorType.RATE_LIMITED)
_SCALE_METHODS = ("compress", "resample")


class ReplayStalledError(LLMTrailError, RuntimeError):
    """Under these settings the calls end up waiting for each other and the replay cannot
    finish: the production pipeline would hang the same way. The message says who holds
    what."""


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """The knobs of one replay. ``None`` limits mean no limit."""

    max_rpm: int | None = None
    max_tpm: int | None = None
    window_s: float = 60.0
    max_concurrent_requests: int = 100
    max_attempts: int = 3
    send_guard_s: float | None = None
    unanswered_guard_s: float = 1.0
    scale: float = 1.0
    scale_method: str = "compress"
    seed: int = 0
    provider_rpm: int | None = None
    provider_tpm: int | None = None
    provider_window_s: float = 60.0
    provider_429_latency_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_rpm", "max_tpm", "provider_rpm", "provider_tpm"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name}={value!r} is invalid: use an int >= 1, or none")
        for name in ("window_s", "provider_window_s", "scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"{name}={value!r} is invalid: use a number > 0")
        for name in ("provider_429_latency_s", "send_guard_s", "unanswered_guard_s"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigurationError(f"{name}={value!r} is invalid: use a number >= 0")
        if self.scale_method not in _SCALE_METHODS:
            raise ConfigurationError(
                f"scale_method={self.scale_method!r} is invalid: use one of {_SCALE_METHODS}"
            )
        # The semaphore and the retry policy validate their own arguments.
        FairSemaphore(self.max_concurrent_requests)
        RetryPolicy(self.max_attempts)

    @classmethod
    def recorded(cls, workload: Workload, **overrides: Any) -> ReplaySettings:
        """The settings the workload was recorded with, with ``overrides`` applied."""
        s = workload.settings
        base = cls(
            max_rpm=s.max_rpm,
            max_tpm=s.max_tpm,
            window_s=s.window_s,
            max_concurrent_requests=s.max_concurrent_requests,
            max_attempts=s.max_attempts,
            send_guard_s=s.send_guard_s,
            unanswered_guard_s=s.unanswered_guard_s,
        )
        return base.with_(**overrides)

    def with_(self, **overrides: Any) -> ReplaySettings:
        known = sorted(f.name for f in fields(self))
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ConfigurationError(f"unknown replay setting(s) {unknown}; known: {known}")
        return replace(self, **overrides)

    @property
    def provider_model(self) -> bool:
        return self.provider_rpm is not None or self.provider_tpm is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The knobs a sweep may vary, by the names users type (aliases map to the setting's name).
KNOBS: dict[str, str] = {
    "max_rpm": "max_rpm",
    "max_tpm": "max_tpm",
    "window": "window_s",
    "window_s": "window_s",
    "rpm_window_seconds": "window_s",
    "max_concurrent": "max_concurrent_requests",
    "max_concurrent_requests": "max_concurrent_requests",
    "scale": "scale",
    "provider_rpm": "provider_rpm",
    "provider_tpm": "provider_tpm",
}


# -- the modelled provider --------------------------------------------------------------------


class ProviderModel:
    """A provider's own rate limit: one sliding window of admitted arrivals ``(t, tokens)``.

    This models the *provider*, not our gates: capacity ``limit * window_s / 60``, a request
    counted when it arrives and for ``window_s`` after, a 429 carrying the time until there is
    room. A request larger than the whole token window gets a 429 without retry-after.
    """

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0) -> None:
        scale = window_s / 60.0
        # The epsilon keeps 240 * 1 / 60 from flooring to 3 through float error.
        self.cap_requests = math.floor(rpm * scale + 1e-9) if rpm else None
        self.cap_tokens = math.floor(tpm * scale + 1e-9) if tpm else None
        for cap in (self.cap_requests, self.cap_tokens):
            if cap is not None and cap < 1:
                raise ConfigurationError(
                    f"the provider limit allows {cap} per {window_s}s window: raise "
                    "provider_rpm/provider_tpm or provider_window_s"
                )
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self.rejected = 0

    def _purge(self, now: float) -> None:
        entries, window = self._entries, self.window_s
        while entries and entries[0][0] + window <= now:
            self._tokens -= entries.popleft()[1]

    def arrive(self, now: float, tokens: int) -> tuple[bool, float | None]:
        """(admitted, retry_after_s) for a request arriving at ``now``."""
        self._purge(now)
        if self.cap_tokens is not None and tokens > self.cap_tokens:
            self.rejected += 1
            return False, None
        need_requests = (
            len(self._entries) + 1 - self.cap_requests if self.cap_requests is not None else 0
        )
        need_tokens = self._tokens + tokens - self.cap_tokens if self.cap_tokens is not None else 0
        if need_requests <= 0 and need_tokens <= 0:
            self._entries.append((now, tokens))
            self._tokens += tokens
            return True, None
        self.rejected += 1
        until = 0.0
        freed_tokens = 0
        for freed_requests, (t, cost) in enumerate(self._entries):
            if freed_requests >= need_requests and freed_tokens >= need_tokens:
                break
            freed_tokens += cost
            until = t + self.window_s - now
        return False, max(until, 0.001)

    def headers(self, now: float) -> tuple[int | None, int | None, float]:
        """(remaining requests, remaining tokens, seconds until the window is empty)."""
        self._purge(now)
        reset = self._entries[-1][0] + self.window_s - now if self._entries else 0.0
        requests = self.cap_requests - len(self._entries) if self.cap_requests is not None else None
        tokens = self.cap_tokens - self._tokens if self.cap_tokens is not None else None
        return requests, tokens, reset


# -- scaling ----------------------------------------------------------------------------------


def scaled_calls(workload: Workload, settings: ReplaySettings) -> list[tuple[float, RecordedCall]]:
    """``(arrival_s, call)`` in arrival order, with the traffic scale applied (module docs)."""
    calls = workload.calls
    k = settings.scale
    if k == 1.0:
        return [(c.arrival_s, c) for c in calls]
    if settings.scale_method == "compress":
        return [(c.arrival_s / k, c) for c in calls]
    rng = random.Random(settings.seed)
    n = len(calls)
    count = max(round(k * n), 1)
    picked: list[tuple[float, RecordedCall]] = []
    for _ in range(count):
        pos = rng.random() * (n - 1)
        j = int(pos)
        frac = pos - j
        if j + 1 < n:
            at = calls[j].arrival_s + frac * (calls[j + 1].arrival_s - calls[j].arrival_s)
            picked.append((at, calls[j + 1] if frac >= 0.5 else calls[j]))
        else:
            picked.append((calls[j].arrival_s, calls[j]))
    picked.sort(key=lambda item: item[0])
    return picked


# -- the simulation ---------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """Per-call results of one replay (or of the recording), index-aligned."""

    arrival: list[float]
    first_sent: list[float]  # NaN: never sent
    finished: list[float]
    rpm_wait: list[float]
    tpm_wait: list[float]
    sem_wait: list[float]
    outcome: list[str]
    error_type: list[str | None]
    retry_gate_waits: list[tuple[float, float]] = field(default_factory=list)
    requests: int = 0
    rate_limited: int = 0
    synthesized: int = 0
    answered: list[RecordedCall] = field(default_factory=list)  # calls that succeeded

    def __repr__(self) -> str:  # short: see Workload.__repr__
        return f"Run(calls={len(self.arrival)}, requests={self.requests})"


class _BoundClock(LoopClock):
    """:class:`~pipeline.LoopClock` bound to the replay's loop: the same time and timers,
    without looking the running loop up on every reading (the gates read the clock several
    times per call)."""

    __slots__ = ("now", "call_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time  # type: ignore[method-assign]
        self.call_at = loop.call_at  # type: ignore[method-assign]


class _Simulation:
    """One replay. The hot path (``_call``) is written for speed: 100,000 calls must replay in
    a few seconds, so it keeps its objects in locals and sleeps on bare futures."""

    def __init__(
        self,
        plan: list[tuple[float, RecordedCall]],
        settings: ReplaySettings,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        n = len(plan)
        self.plan = plan
        self.settings = settings
        nan = math.nan
        self.run = Run(
            arrival=[at for at, _ in plan],
            first_sent=[nan] * n,
            finished=[nan] * n,
            rpm_wait=[0.0] * n,
            tpm_wait=[0.0] * n,
            sem_wait=[0.0] * n,
            outcome=[""] * n,
            error_type=[None] * n,
        )
        self.policy = RetryPolicy(settings.max_attempts)
        self.provider = (
            ProviderModel(settings.provider_rpm, settings.provider_tpm, settings.provider_window_s)
            if settings.provider_model
            else None
        )
        latencies = [a.latency_s for _, c in plan for a in c.attempts if a.error_type is None]
        self.median_latency = statistics.median(latencies) if latencies else 0.0
        self.left = n
        self.next = 0
        self.on_progress: Callable[[int, int], None] | None = None
        self.step = max(n // 50, 1)
        scale = settings.window_s / 60.0
        self.loop = loop
        self.clock = _BoundClock(loop)
        # The gates are built as BaseLLMService builds them: capacity = limit x window / 60.
        self.rpm = (
            SlidingWindowGate(
                "rpm",
                math.floor(settings.max_rpm * scale),
                settings.window_s,
                clock=self.clock,
                send_guard_s=settings.send_guard_s,
            )
            if settings.max_rpm
            else None
        )
        self.tpm = (
            SlidingWindowGate(
                "tpm",
                math.floor(settings.max_tpm * scale),
                settings.window_s,
                clock=self.clock,
                send_guard_s=settings.send_guard_s,
            )
            if settings.max_tpm
            else None
        )
        self.sem = FairSemaphore(settings.max_concurrent_requests)

    async def main(self) -> Run:
        loop = self.loop
        self.done: asyncio.Future[None] = loop.create_future()
        if not self.plan:
            return self.run
        self.call = self._call_with_model if self.provider is not None else self._call
        self._arrive()
        await self.done
        return self.run

    def _arrive(self) -> None:
        """Start every call due by now, then arm one timer for the next arrival.

        One timer at a time keeps the loop's heap small. A started task stays referenced by
        the future it awaits (held by a timer, a gate's queue or the semaphore's queue).
        """
        plan, i, n = self.plan, self.next, len(self.plan)
        due = plan[i][0]
        create, call = self.loop.create_task, self.call
        while i < n and plan[i][0] <= due:
            create(call(i, plan[i][1]))
            i += 1
        self.next = i
        if i < n:
            self.loop.call_at(plan[i][0], self._arrive)

    def _finish(self, index: int, outcome: str, error_type: str | None) -> None:
        run = self.run
        run.finished[index] = self.loop.time()
        if outcome != "succeeded":
            run.outcome[index] = outcome
            run.error_type[index] = error_type
        else:
            run.outcome[index] = outcome
        self.left -= 1
        left = self.left
        if left % self.step == 0:
            if self.on_progress is not None:
                self.on_progress(len(self.plan) - left, len(self.plan))
            if not left and not self.done.done():
                self.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    async def _admit(
        self, index: int, recorded: RecordedCall
    ) -> tuple[GateReservation | None, GateReservation | None] | None:
        """RPM gate, then TPM gate, then the semaphore; None when the call can never pass."""
        run, rpm, tpm = self.run, self.rpm, self.tpm
        rpm_res = tpm_res = None
        if rpm is not None:
            rpm_res = await rpm.acquire(1)
            if rpm_res.waited_s:
                run.rpm_wait[index] = rpm_res.waited_s
        if tpm is not None:
            try:
                tpm_res = await tpm.acquire(recorded.reserved_tokens)
            except GateRequestTooLarge:
                if rpm is not None and rpm_res is not None:
                    rpm.release(rpm_res)  # never sent: the service gives it back
                self._finish(index, "failed", str(ErrorType.TOO_LARGE))
                return None
            if tpm_res.waited_s:
                run.tpm_wait[index] = tpm_res.waited_s
        loop = self.loop
        started = loop.time()
        await self.sem.acquire()
        waited = loop.time() - started
        if waited:
            run.sem_wait[index] = waited
        if recorded.attempts:
            run.first_sent[index] = loop.time()  # attempt 1 is sent right after the semaphore
        return rpm_res, tpm_res

    async def _retry_gate(self, index: int) -> GateReservation | None:
        rpm = self.rpm
        if rpm is None:
            return None
        res = await rpm.acquire(1)
        if res.waited_s > 0:
            now = self.loop.time()
            self.run.retry_gate_waits.append((now - res.waited_s, now))
            self.run.rpm_wait[index] += res.waited_s
        return res

    def _mark_sent(self, rpm_res: GateReservation | None, tpm_res: GateReservation | None) -> None:
        if rpm_res is not None and self.rpm is not None:
            self.rpm.mark_sent(rpm_res)
        if tpm_res is not None and self.tpm is not None:
            self.tpm.mark_sent(tpm_res)
        self.run.requests += 1

    def _mark_done(
        self, rpm_res: GateReservation | None, tpm_res: GateReservation | None, answered: bool
    ) -> None:
        """The attempt is over: its windows end one window from now (plus a guard when no
        HTTP answer proves the request arrived), as the service's ``_attempt`` does."""
        guard = 0.0 if answered else self.settings.unanswered_guard_s
        if rpm_res is not None and self.rpm is not None:
            self.rpm.mark_done(rpm_res, unanswered_guard_s=guard)
        if tpm_res is not None and self.tpm is not None:
            self.tpm.mark_done(tpm_res, unanswered_guard_s=guard)

    def _settle(
        self,
        recorded: RecordedCall,
        rpm_res: GateReservation | None,
        tpm_res: GateReservation | None,
        answered: bool,
        reached: bool,
    ) -> None:
        """After the semaphore is released: reconcile, or give back what was never counted."""
        rpm, tpm = self.rpm, self.tpm
        if answered:
            if tpm is not None and tpm_res is not None:
                tpm.reconcile(tpm_res, recorded.tpm_counted)
            return
        for gate, res in ((rpm, rpm_res), (tpm, tpm_res)):
            if gate is None or res is None or res.done:
                continue
            if res.pending or not reached:
                gate.release(res)

    async def _latency(self, seconds: float) -> None:
        """The provider's answer time: a bare future on a timer (asyncio.sleep does more)."""
        loop = self.loop
        future = loop.create_future()
        loop.call_at(loop.time() + seconds, future.set_result, None)
        await future

    async def _call(self, index: int, recorded: RecordedCall) -> None:
        """Provider model off: every attempt as recorded.

        This is ``_admit`` + ``_mark_sent`` + ``_latency`` + ``_mark_done`` inlined (the model
        path below uses the methods): one coroutine per call instead of four.
        """
        try:
            attempts = recorded.attempts
            if not attempts:
                await self._unsent(index, recorded)
                return
            run, rpm, tpm, loop = self.run, self.rpm, self.tpm, self.loop
            rpm_res = tpm_res = None
            if rpm is not None:
                rpm_res = await rpm.acquire(1)
                if rpm_res.waited_s:
                    run.rpm_wait[index] = rpm_res.waited_s
            if tpm is not None:
                try:
                    tpm_res = await tpm.acquire(recorded.reserved_tokens)
                except GateRequestTooLarge:
                    if rpm is not None and rpm_res is not None:
                        rpm.release(rpm_res)  # never sent: the service gives it back
                    self._finish(index, "failed", str(ErrorType.TOO_LARGE))
                    return
                if tpm_res.waited_s:
                    run.tpm_wait[index] = tpm_res.waited_s
            sem = self.sem
            started = loop.time()
            await sem.acquire()
            now = loop.time()
            if now != started:
                run.sem_wait[index] = now - started
            run.first_sent[index] = now
            answered = reached = False
            error: str | None = None
            try:
                for n, attempt in enumerate(attempts, start=1):
                    if n > 1:
                        rpm_res = await self._retry_gate(index)
                    # sent: both reservations' windows start (mark_sent)
                    if rpm_res is not None and rpm is not None:
                        rpm.mark_sent(rpm_res)
                    if tpm_res is not None and tpm is not None:
                        tpm.mark_sent(tpm_res)
                    run.requests += 1
                    # the provider's answer time
                    future = loop.create_future()
                    loop.call_at(loop.time() + attempt.latency_s, future.set_result, None)
                    await future
                    error = attempt.error_type
                    if error is None:
                        answered = reached = True
                    else:
                        if error == _RATE_LIMITED:
                            run.rate_limited += 1
                        if attempt.reached:
                            reached = True
                        elif rpm_res is not None and rpm is not None:
                            rpm.release(rpm_res)  # refused: the provider never counted it
                    # done: the windows end one window from now (+ a guard if unanswered)
                    guard = 0.0 if attempt.answered else self.settings.unanswered_guard_s
                    if rpm_res is not None and rpm is not None:
                        rpm.mark_done(rpm_res, unanswered_guard_s=guard)
                    if tpm_res is not None and tpm is not None:
                        tpm.mark_done(tpm_res, unanswered_guard_s=guard)
                    if answered or attempt.wait_s is None:
                        break
                    await self.clock.sleep(attempt.wait_s)  # the service waits on its clock
            finally:
                sem.release()
            if answered:
                if tpm is not None and tpm_res is not None:
                    tpm.reconcile(tpm_res, recorded.tpm_counted)
                run.answered.append(recorded)
                self._finish(index, "succeeded", None)
            else:
                self._settle(recorded, rpm_res, tpm_res, False, reached)
                self._finish(index, "cancelled" if error == "cancelled" else "failed", error)
        except asyncio.CancelledError:  # torn down after a stall
            raise
        except BaseException as exc:  # a bug here must stop the replay, not hang it
            self._fail(exc)
            raise

    async def _unsent(self, index: int, recorded: RecordedCall) -> None:
        """A call that never sent an attempt (validation, too large, cancelled while queued):
        it takes its slots and ends as recorded; there is no provider latency to replay."""
        if recorded.error_type == "validation":  # it never reached a gate
            self._finish(index, recorded.outcome, recorded.error_type)
            return
        admitted = await self._admit(index, recorded)
        if admitted is not None:
            self.sem.release()
            self._settle(recorded, *admitted, False, False)
            self._finish(index, recorded.outcome, recorded.error_type)

    async def _call_with_model(self, index: int, recorded: RecordedCall) -> None:
        """Provider model on: modelled 429s, the RetryPolicy, recorded non-429 outcomes."""
        try:
            if not recorded.attempts:
                await self._unsent(index, recorded)
                return
            admitted = await self._admit(index, recorded)
            if admitted is None:
                return
            rpm_res, tpm_res = admitted
            provider = self.provider
            assert provider is not None
            policy = self.policy
            clock = self.clock
            script = [a for a in recorded.attempts if a.error_type != _RATE_LIMITED]
            charge = recorded.tpm_counted
            answered = reached = synthesized = False
            error: str | None = None
            n = 0
            try:
                while True:
                    n += 1
                    if n > 1:
                        rpm_res = await self._retry_gate(index)
                    self._mark_sent(rpm_res, tpm_res)
                    # A refused connection never arrives: the provider does not see it.
                    arrives = not script or script[0].reached
                    admitted_now, retry_after = (
                        provider.arrive(clock.now(), charge) if arrives else (True, None)
                    )
                    if not admitted_now:  # a modelled 429: an HTTP answer, it reached
                        reached = True
                        self.run.rate_limited += 1
                        await self._latency(self.settings.provider_429_latency_s)
                        self._observe(clock.now())
                        self._mark_done(rpm_res, tpm_res, True)
                        error = _RATE_LIMITED
                        exc = ProviderError(
                            ErrorType.RATE_LIMITED,
                            "modelled provider rate limit",
                            retryable=True,
                            status=429,
                            retry_after_s=retry_after,
                        )
                        if n >= policy.max_attempts or not policy.should_retry(exc):
                            break
                        await clock.sleep(_policy_wait(policy, exc, n))
                        continue
                    if not script:  # every recorded attempt was a 429: no recorded answer
                        await self._latency(self.median_latency)
                        self._mark_done(rpm_res, tpm_res, True)
                        self._observe(clock.now())
                        answered = reached = synthesized = True
                        break
                    attempt = script.pop(0)
                    await self._latency(attempt.latency_s)
                    error = attempt.error_type
                    if error is None:
                        self._mark_done(rpm_res, tpm_res, True)
                        self._observe(clock.now())
                        answered = reached = True
                        break
                    if attempt.reached:
                        reached = True
                        if attempt.answered:
                            self._observe(clock.now())
                    elif rpm_res is not None and self.rpm is not None:
                        self.rpm.release(rpm_res)
                    self._mark_done(rpm_res, tpm_res, attempt.answered)
                    if attempt.wait_s is None or n >= policy.max_attempts:
                        break
                    await clock.sleep(attempt.wait_s)
            finally:
                self.sem.release()
            self._settle(recorded, rpm_res, tpm_res, answered, reached)
            if synthesized:
                self.run.synthesized += 1
                self._finish(index, "succeeded", None)
            elif answered:
                self.run.answered.append(recorded)
                self._finish(index, "succeeded", None)
            else:
                self._finish(index, "cancelled" if error == "cancelled" else "failed", error)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    async def stall_report(self) -> str:
        """Why nothing can move: who holds what, read from the gates and the semaphore."""
        now, sem, rpm, tpm = self.loop.time(), self.sem, self.rpm, self.tpm
        lines = [
            f"the replay stalled at t={now:,.1f} s with {self.left:,} of {len(self.plan):,} "
            "calls unfinished and nothing left that could move them",
            f"semaphore: {sem.in_flight()} of {sem.limit} permits held, {sem.waiting():,} "
            "calls waiting",
        ]
        for gate in (rpm, tpm):
            if gate is not None:
                lines.append(
                    f"{gate.name} gate: {gate.used():,} of {gate.capacity:,} in use, "
                    f"{gate.reserved():,} of them reserved by calls not sent yet, "
                    f"{gate.waiting():,} calls waiting"
                )
        if rpm is not None and rpm.waiting() and rpm.reserved() and sem.in_flight() == sem.limit:
            lines.append(
                "the semaphore's holders wait at the RPM gate to retry while calls queued for "
                "the semaphore hold the gate's slots as unsent reservations, which never "
                "expire: the pipeline would deadlock the same way. Raise max_rpm or "
                "max_concurrent_requests (or fix the retry path in pipeline/_flow.py)"
            )
        return "; ".join(lines)

    def _observe(self, now: float) -> None:
        """What production does with the x-ratelimit-* headers of every answer."""
        assert self.provider is not None
        requests, tokens, reset = self.provider.headers(now)
        if self.rpm is not None:
            self.rpm.observe_provider(requests, reset)
        if self.tpm is not None:
            self.tpm.observe_provider(tokens, reset)


def _policy_wait(policy: RetryPolicy, exc: ProviderError, attempt: int) -> float:
    """The production policy's wait after ``attempt`` failed with ``exc``."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return policy.wait_for(state)


# -- figures ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    calls: int
    succeeded: int
    failed: int
    requests: int
    rate_limited: int
    makespan_s: float
    drain_s: float
    throughput_cps: float
    requests_per_min: float
    queue_delay_s: dict[str, float]  # p50, p95, p99, mean
    total_latency_s: dict[str, float]
    gate_wait_s: dict[str, dict[str, float]]  # rpm / tpm / semaphore -> mean, p95
    peak_queue: int
    cost_usd: Decimal
    unpriced_calls: int
    synthesized: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_usd"] = str(self.cost_usd)
        return data


def _pcts(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan}
    p50, p95, p99 = np.percentile(values, (50, 95, 99))
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean())}


def _mean_p95(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"mean": math.nan, "p95": math.nan}
    return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95))}


def queue_timeline(run: Run) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(times, queue length from each time on): a step function, for the peak and the plot."""
    arrival = np.asarray(run.arrival, dtype=float)
    sent = np.asarray(run.first_sent, dtype=float)
    finished = np.asarray(run.finished, dtype=float)
    left = np.where(np.isnan(sent), finished, sent)
    starts = [arrival]
    ends = [left]
    if run.retry_gate_waits:
        extra = np.asarray(run.retry_gate_waits, dtype=float)
        starts.append(extra[:, 0])
        ends.append(extra[:, 1])
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    # A call sent on arrival never queued. Recorded send times are derived (answer time minus
    # latency, wall clock against monotonic), so waits under 0.1 ms are taken as none.
    waited = end - start > 1e-4
    start, end = start[waited], end[waited]
    times = np.concatenate([start, end])
    delta = np.concatenate([np.ones_like(start), -np.ones_like(end)])
    if times.size == 0:
        return times, delta
    order = np.argsort(times, kind="stable")
    times, delta = times[order], delta[order]
    # One step per instant, after everything that happened at it: no transient dips or peaks
    # from the order of simultaneous events.
    instants, first = np.unique(times, return_index=True)
    return instants, np.cumsum(np.add.reduceat(delta, first))


def _cost(calls: Iterable[RecordedCall], prices: PriceTable) -> tuple[Decimal, int]:
    """Exact cost of the answered calls' real tokens, priced as the service prices them."""
    sums: dict[tuple[str, str | None], list[int]] = {}
    for c in calls:
        key = (c.model, c.response_model)
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0]
        acc[0] += c.input_tokens
        acc[1] += min(c.cached_tokens, c.input_tokens)
        acc[2] += c.output_tokens
        acc[3] += 1
    total = Decimal(0)
    unpriced = 0
    for (model, response_model), (inp, cached, out, count) in sums.items():
        priced_as = response_model if response_model and prices.price(response_model) else model
        cost = prices.cost(priced_as, input_tokens=inp, cached_tokens=cached, output_tokens=out)
        if cost is None:
            unpriced += count
        else:
            total += cost
    return total, unpriced


def figures(run: Run, prices: PriceTable | None = None) -> Figures:
    arrival = np.asarray(run.arrival, dtype=float)
    sent = np.asarray(run.first_sent, dtype=float)
    finished = np.asarray(run.finished, dtype=float)
    n = arrival.size
    makespan = float(finished.max() - arrival.min()) if n else 0.0
    drain = float(finished.max() - arrival.max()) if n else 0.0
    was_sent = ~np.isnan(sent)
    outcomes = Counter(run.outcome)
    _, queue = queue_timeline(run)
    cost, unpriced = _cost(run.answered, prices or PriceTable.default())
    per_s = 1.0 / makespan if makespan > 0 else math.nan
    return Figures(
        calls=n,
        succeeded=outcomes.get("succeeded", 0),
        failed=n - outcomes.get("succeeded", 0),
        requests=run.requests,
        rate_limited=run.rate_limited,
        makespan_s=makespan,
        drain_s=drain,
        throughput_cps=n * per_s,
        requests_per_min=run.requests * per_s * 60.0,
        queue_delay_s=_pcts(sent[was_sent] - arrival[was_sent]),
        total_latency_s=_pcts(finished - arrival),
        gate_wait_s={
            "rpm": _mean_p95(np.asarray(run.rpm_wait, dtype=float)),
            "tpm": _mean_p95(np.asarray(run.tpm_wait, dtype=float)),
            "semaphore": _mean_p95(np.asarray(run.sem_wait, dtype=float)),
        },
        peak_queue=int(queue.max()) if queue.size else 0,
        cost_usd=cost,
        unpriced_calls=unpriced,
        synthesized=run.synthesized,
    )


def recorded_run(workload: Workload) -> Run:
    """The recording, in the simulation's terms."""
    calls = workload.calls
    nan = math.nan
    run = Run(
        arrival=[c.arrival_s for c in calls],
        first_sent=[nan if c.first_sent_s is None else c.first_sent_s for c in calls],
        # total_s is monotonic time from the call's start: immune to wall-clock steps.
        finished=[c.arrival_s + c.total_s for c in calls],
        rpm_wait=[c.rpm_wait_s for c in calls],
        tpm_wait=[c.tpm_wait_s for c in calls],
        sem_wait=[c.semaphore_wait_s for c in calls],
        outcome=[c.outcome for c in calls],
        error_type=[c.error_type for c in calls],
        retry_gate_waits=[w for c in calls for w in c.retry_gate_waits],
        requests=sum(len(c.attempts) for c in calls),
        rate_limited=sum(1 for c in calls for a in c.attempts if a.error_type == _RATE_LIMITED),
        answered=[c for c in calls if c.outcome == "succeeded"],
    )
    return run


def recorded_figures(workload: Workload, prices: PriceTable | None = None) -> Figures:
    return figures(recorded_run(workload), prices)


@dataclass(slots=True)
class Replay:
    settings: ReplaySettings
    run: Run
    figures: Figures


def replay(
    workload: Workload,
    settings: ReplaySettings | None = None,
    *,
    prices: PriceTable | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Replay:
    """Re-run ``workload`` under ``settings`` (default: as recorded) on virtual time.

    This runs its own event loop, so it cannot be called from async code: there, use
    :func:`replay_async` (the same, in a worker thread).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "replay() runs its own virtual-time event loop and cannot run inside another: "
            "use `await replay_async(...)` in async code"
        )
    settings = settings or ReplaySettings.recorded(workload)
    with paused_gc():
        return _replay(workload, settings, prices, on_progress)


def _replay(
    workload: Workload,
    settings: ReplaySettings,
    prices: PriceTable | None,
    on_progress: Callable[[int, int], None] | None,
) -> Replay:
    loop = VirtualTimeLoop()
    sim = _Simulation(scaled_calls(workload, settings), settings, loop)
    sim.on_progress = on_progress
    try:
        try:
            run: Run = loop.run_until_complete(sim.main())
        except RuntimeError as exc:
            if sim.left == 0:
                raise
            # The loop found nothing scheduled and nothing ready with calls unfinished: they
            # wait for each other. Describe it, then cancel them so that nothing leaks.
            report = loop.run_until_complete(sim.stall_report())
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            raise ReplayStalledError(report) from exc
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return Replay(settings, run, figures(run, prices))


async def replay_async(
    workload: Workload,
    settings: ReplaySettings | None = None,
    *,
    prices: PriceTable | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Replay:
    """:func:`replay` for async code: it runs in a worker thread, off the caller's loop."""
    return await asyncio.to_thread(
        replay, workload, settings, prices=prices, on_progress=on_progress
    )


# -- sweeps -----------------------------------------------------------------------------------


@dataclass(slots=True)
class SweepRow:
    knobs: dict[str, Any]
    replay: Replay | None  # None: the combination stalled
    stalled: str | None = None  # why, when it stalled

    def to_dict(self) -> dict[str, Any]:
        figures = self.replay.figures.to_dict() if self.replay is not None else {}
        return {"knobs": self.knobs, "stalled": self.stalled, **figures}


def sweep(
    workload: Workload,
    base: ReplaySettings,
    grid: Sequence[tuple[str, Sequence[Any]]],
    *,
    prices: PriceTable | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[SweepRow]:
    """One replay per combination of ``grid`` (knob name, values), in grid order (the last
    knob varies fastest). ``on_progress(description, done, total)`` reports each replay's
    calls and, as ``"sweep"``, the combinations done."""
    names = []
    for name, values in grid:
        if name not in KNOBS:
            raise ConfigurationError(f"cannot sweep {name!r}: use one of {sorted(KNOBS)}")
        if not values:
            raise ConfigurationError(f"--sweep {name}= has no values: give e.g. {name}=10,20")
        names.append(KNOBS[name])
    combos: list[tuple[Any, ...]] = [()]
    for _, values in grid:
        combos = [combo + (value,) for combo in combos for value in values]
    rows = []
    for i, combo in enumerate(combos):
        knobs = dict(zip([name for name, _ in grid], combo, strict=True))
        settings = base.with_(**dict(zip(names, combo, strict=True)))
        label = "replaying " + " ".join(f"{k}={v}" for k, v in knobs.items())
        step = None if on_progress is None else functools.partial(on_progress, label)
        try:
            result = replay(workload, settings, prices=prices, on_progress=step)
        except ReplayStalledError as exc:
            rows.append(SweepRow(knobs, None, str(exc)))
        else:
            rows.append(SweepRow(knobs, result))
        if on_progress is not None:
            on_progress("sweep", i + 1, len(combos))
    return rows


def _order_key(row: SweepRow) -> tuple[float, ...]:
    return tuple(math.inf if v is None else float(v) for v in row.knobs.values())


def cheapest_meeting(rows: Sequence[SweepRow], target_p95_s: float) -> SweepRow | None:
    """The cheapest row whose total-latency p95 is at most ``target_p95_s``.

    Cheapest = lowest limits, compared in the order the knobs were swept: the first ``--sweep``
    is the most significant (put the knob that costs most first), then the next, and so on;
    ``none`` (no limit) counts as infinite.
    """
    meeting = [
        r
        for r in rows
        if r.replay is not None and r.replay.figures.total_latency_s["p95"] <= target_p95_s
    ]
    return min(meeting, key=_order_key) if meeting else None

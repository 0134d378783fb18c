"""Capacity analysis by replay: recorded traffic re-run on a virtual clock.

The simulation runs every recorded call through the production :class:`~pipeline.SlidingWindowGate`
(RPM and TPM) and :class:`~pipeline.FairSemaphore`, on a :class:`~pipeline.VirtualTimeLoop`:
the gates' default :class:`~pipeline.LoopClock` reads that loop's time, so their timers fire in
order and instantly, and there is no second implementation of the rate logic. Each call follows
the service's order (``pipeline/_flow.py``): RPM gate reserves 1 -> TPM gate reserves the
recorded ``reserved_tokens`` -> per attempt: [a new RPM slot for a retry] -> a semaphore permit
-> ``mark_sent`` on both reservations -> the recorded provider latency -> ``mark_done`` (the
windows end one window after the answer, or ``unanswered_guard_s`` later without an HTTP
answer) -> the permit released -> the retry wait (no permit held) -> ... -> TPM reconciled to
``input + (max_output_tokens or output)`` for an answered call, or the reservations the
provider never counted given back.

What the replay does not model: the client's own CPU time. Provider latency is replayed as it
was measured (send to answer, so it includes the client's HTTP work under the recorded load);
the work between answers and sends is taken as free. A client that is itself saturated is
therefore predicted a little faster than it runs.

Should the calls ever end up waiting for each other (nothing scheduled, calls unfinished), the
virtual loop stalls; :func:`replay` then raises :class:`ReplayStalledError` saying who holds
what, because the production pipeline would hang the same way. (The service takes a permit
only after the attempt's RPM slot and never holds one at a gate or in a backoff, which rules
out the retry deadlock an earlier flow had; the check stays as a guard.)

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
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState

from llmtrail.pipeline import (
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

from ._replay_figures import (
    Figures,
    Run,
    figures,
    queue_timeline,
    recorded_figures,
    recorded_run,
)
from ._replay_model import KNOBS, ProviderModel, ReplaySettings, scaled_calls
from ._workload import RecordedCall, Workload, paused_gc

__all__ = [
    "KNOBS",
    "Figures",
    "ProviderModel",
    "Replay",
    "ReplaySettings",
    "ReplayStalledError",
    "Run",
    "SweepRow",
    "cheapest_meeting",
    "figures",
    "queue_timeline",
    "recorded_figures",
    "recorded_run",
    "replay",
    "replay_async",
    "scaled_calls",
    "sweep",
]

_RATE_LIMITED = str(ErrorType.RATE_LIMITED)


class ReplayStalledError(LLMTrailError, RuntimeError):
    """Under these settings the calls end up waiting for each other and the replay cannot
    finish: the production pipeline would hang the same way. The message says who holds
    what."""


# -- the simulation ---------------------------------------------------------------------------


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
        """RPM gate, then TPM gate; None when the call can never pass (it is then finished)."""
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
        return rpm_res, tpm_res

    async def _permit(
        self, index: int, n: int, rpm_res: GateReservation | None
    ) -> GateReservation | None:
        """Before attempt ``n``: its RPM slot (a new one for a retry), then a permit. Returns
        the attempt's RPM reservation; the permit is held until the caller releases it."""
        run, rpm, loop = self.run, self.rpm, self.loop
        ready = loop.time()
        if n > 1 and rpm is not None:
            rpm_res = await rpm.acquire(1)
            run.rpm_wait[index] += rpm_res.waited_s
        started = loop.time()
        await self.sem.acquire()
        now = loop.time()
        run.sem_wait[index] += now - started
        if n == 1:
            run.first_sent[index] = now
        elif now > ready:  # a retry queued at the RPM gate and/or for a permit
            run.retry_gate_waits.append((ready, now))
        return rpm_res

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
        HTTP answer proves the request arrived), as the service's ``_send`` does."""
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
        """After the attempts: reconcile, or give back what the provider never counted."""
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

        The first attempt's path (gates, permit, send, answer) is inlined: one coroutine per
        call instead of several, for speed; retries take the same steps through the methods.
        """
        try:
            attempts = recorded.attempts
            if not attempts:
                await self._unsent(index, recorded)
                return
            run, rpm, tpm, loop, sem = self.run, self.rpm, self.tpm, self.loop, self.sem
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
            answered = reached = False
            error: str | None = None
            for n, attempt in enumerate(attempts, start=1):
                if n == 1:
                    started = loop.time()
                    await sem.acquire()
                    now = loop.time()
                    if now != started:
                        run.sem_wait[index] = now - started
                    run.first_sent[index] = now
                else:
                    rpm_res = await self._permit(index, n, rpm_res)
                # The permit is held for the attempt only, as the service's _attempt does.
                try:
                    if rpm_res is not None and rpm is not None:
                        rpm.mark_sent(rpm_res)
                    if tpm_res is not None and tpm is not None:
                        tpm.mark_sent(tpm_res)
                    run.requests += 1
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
                    # The windows end one window from now (+ a guard without an HTTP answer).
                    guard = 0.0 if attempt.answered else self.settings.unanswered_guard_s
                    if rpm_res is not None and rpm is not None:
                        rpm.mark_done(rpm_res, unanswered_guard_s=guard)
                    if tpm_res is not None and tpm is not None:
                        tpm.mark_done(tpm_res, unanswered_guard_s=guard)
                finally:
                    sem.release()
                if answered or attempt.wait_s is None:
                    break
                await self.clock.sleep(attempt.wait_s)  # the service waits on its clock
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
        it takes its gate slots and ends as recorded; there is no provider latency to replay."""
        if recorded.error_type == "validation":  # it never reached a gate
            self._finish(index, recorded.outcome, recorded.error_type)
            return
        admitted = await self._admit(index, recorded)
        if admitted is not None:
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
            while True:
                n += 1
                rpm_res = await self._permit(index, n, rpm_res)
                retry_wait: float | None = None
                try:
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
                        if n < policy.max_attempts and policy.should_retry(exc):
                            retry_wait = _policy_wait(policy, exc, n)
                    elif not script:  # every recorded attempt was a 429: no recorded answer
                        await self._latency(self.median_latency)
                        self._mark_done(rpm_res, tpm_res, True)
                        self._observe(clock.now())
                        answered = reached = synthesized = True
                    else:
                        attempt = script.pop(0)
                        await self._latency(attempt.latency_s)
                        error = attempt.error_type
                        if error is None:
                            self._mark_done(rpm_res, tpm_res, True)
                            self._observe(clock.now())
                            answered = reached = True
                        else:
                            if attempt.reached:
                                reached = True
                                if attempt.answered:
                                    self._observe(clock.now())
                            elif rpm_res is not None and self.rpm is not None:
                                self.rpm.release(rpm_res)
                            self._mark_done(rpm_res, tpm_res, attempt.answered)
                            if n < policy.max_attempts:
                                retry_wait = attempt.wait_s
                finally:
                    self.sem.release()
                if answered or retry_wait is None:
                    break
                await clock.sleep(retry_wait)
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

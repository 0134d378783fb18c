"""One replay's simulation: recorded calls through the production gates on virtual time.

Every call goes through the production :class:`~pipeline.SlidingWindowGate` (RPM and TPM) and
:class:`~pipeline.FairSemaphore`, through their public methods, on a
:class:`~pipeline.VirtualTimeLoop`, in the service's order (``pipeline/_flow.py``): RPM gate
reserves 1 -> TPM gate reserves the recorded ``reserved_tokens`` -> per attempt: [a new RPM
slot for a retry] -> a semaphore permit -> the write-ahead of its ``sent`` event (as recorded,
without ``client_cpu_s``) -> ``mark_sent`` on both reservations -> the attempt's
time -> ``mark_done`` (the windows end one window after the answer, or ``unanswered_guard_s``
later without an HTTP answer) -> the permit released -> the retry wait (no permit held) -> ...
-> TPM reconciled to ``input + (max_output_tokens or output)`` for an answered call, or the
reservations the provider never counted given back.

Two ways to decide attempts (``ReplaySettings.modelled_errors``):
- **recorded** (:meth:`Simulation.scripted`): each attempt takes its recorded outcome and
  time, and the recorded retry wait, as far as ``max_attempts`` allows.
- **modelled** (:meth:`Simulation.modelled_call`): each attempt's outcome is drawn. The provider
  model (when limits are set) checks it first, counting every arrival and answering 429 with
  that request's own retry-after; then the :class:`~storage._replay_model.FaultModel` draws
  one of the recorded errors (500s, timeouts, injected 429s, ...) at its recorded share, else
  the call's recorded answer comes back (a call never answered in the recording takes an
  answer time drawn from the answered ones). The production :class:`~pipeline.RetryPolicy`
  decides every retry and its wait (retry-after first, else jittered backoff). A call whose
  every attempt failed, 429s included, fails with the last error.

An attempt's time is its recorded latency after its recorded ``pre_send_s``
(``client_cpu_s=None``), or the provider's own time plus ``client_cpu_s`` of client CPU (which
stands for both) served one attempt at a time (one event loop), so that a busier client queues
for it. Either way without the time a gate held it at the wire in the
recording (:func:`~storage._replay_model.attempt_time`): the replay's gates hold it themselves.

Invariants:
- Nothing sleeps for real; a replay is deterministic given the workload and the settings (the
  random draws, resampling's and the modelled outcomes', come from ``Random(seed)``).
- Should the calls end up waiting for each other (nothing scheduled, calls unfinished), the
  virtual loop stalls; the caller then reports :meth:`Simulation.stall_report`.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

from tenacity import RetryCallState

from llmtrail.pipeline import (
    ErrorType,
    FairSemaphore,
    GateRequestTooLarge,
    GateReservation,
    LoopClock,
    ProviderError,
    RetryPolicy,
    SlidingWindowGate,
)
from llmtrail.pipeline._gate_steps import gate_capacity
from llmtrail.pipeline._gates import GRANT_LEAD_S

from ._replay_figures import Run
from ._replay_model import (
    FaultModel,
    ProviderModel,
    ReplaySettings,
    attempt_time,
    usual_pre_write,
    waited_at_a_gate,
)
from ._workload import RecordedCall, Workload

__all__ = ["Simulation"]

_RATE_LIMITED = str(ErrorType.RATE_LIMITED)


class _BoundClock(LoopClock):
    """:class:`~pipeline.LoopClock` bound to the replay's loop: the same time and timers,
    without looking the running loop up on every reading (the gates read the clock several
    times per call)."""

    __slots__ = ("now", "call_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time  # type: ignore[method-assign]
        self.call_at = loop.call_at  # type: ignore[method-assign]


def _error_type(name: str) -> ErrorType:
    try:
        return ErrorType(name)
    except ValueError:
        return ErrorType.SERVER_ERROR


class Simulation:
    """One replay. The hot path (:meth:`scripted`) is written for speed: 100,000 calls must
    replay in a few seconds, so it keeps its objects in locals and sleeps on bare futures."""

    def __init__(
        self,
        plan: list[tuple[float, RecordedCall]],
        settings: ReplaySettings,
        workload: Workload,
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
        self.policy: RetryPolicy = settings.retry_policy()
        self.provider = (
            ProviderModel(
                settings.provider_rpm,
                settings.provider_tpm,
                settings.provider_window_s,
                counts_rejected=settings.provider_counts_rejected,
            )
            if settings.provider_model
            else None
        )
        self.modelled = settings.modelled_errors(workload)
        self.cpu = settings.client_cpu_s
        self.cpu_free = 0.0
        self.rng = random.Random(settings.seed)
        self.pre_write = usual_pre_write(workload)
        if self.modelled:
            self.faults = FaultModel(workload, limit_429s=self.provider is None)
            self.answer_times = [
                attempt_time(a, self.cpu is not None, self._pre_write(c))
                for c in workload.calls
                for a in c.attempts
                if a.error_type is None
            ] or [0.0]
        self.left = n
        self.next = 0
        self.on_progress: Callable[[int, int], None] | None = None
        self.step = max(n // 50, 1)
        self.loop = loop
        self.clock = _BoundClock(loop)

        # The gates are built as BaseLLMService builds them (the same capacity rule).
        def new_gate(name: str, limit: int | None) -> SlidingWindowGate | None:
            if not limit:
                return None
            capacity = gate_capacity(limit, settings.window_s)
            window, guard = settings.window_s, settings.send_guard_s
            return SlidingWindowGate(name, capacity, window, clock=self.clock, send_guard_s=guard)

        self.rpm, self.tpm = new_gate("rpm", settings.max_rpm), new_gate("tpm", settings.max_tpm)
        # A recording made with the send-time hook had gates that grant ahead and requests
        # held at the wire until their slots' time (the service's rule): replay that too.
        self.hooked = any(
            a.body_sent_s is not None for c in workload.calls[:1000] for a in c.attempts
        )
        if self.hooked:
            for gate in (self.rpm, self.tpm):
                if gate is not None:
                    gate.lead_s = GRANT_LEAD_S
        self.sem = FairSemaphore(settings.max_concurrent_requests)

    async def main(self) -> Run:
        loop = self.loop
        self.done: asyncio.Future[None] = loop.create_future()
        if not self.plan:
            return self.run
        self.call = self.modelled_call if self.modelled else self.scripted
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
        run.outcome[index] = outcome
        if outcome != "succeeded":
            run.error_type[index] = error_type
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

    async def _send(
        self,
        rpm_res: GateReservation | None,
        tpm_res: GateReservation | None,
        hooked: bool,
    ) -> None:
        """The attempt leaves, as the service's ``_send`` does: held at the wire until its
        slots' time when a gate granted them ahead, then, if the recording had the send-time
        hook (``hooked``), its windows start at most ``arrival_guard_s`` after that (the body's
        write itself, milliseconds, is within the guard)."""
        held = max((r.not_before for r in (rpm_res, tpm_res) if r is not None), default=-math.inf)
        for gate, res in ((self.rpm, rpm_res), (self.tpm, tpm_res)):
            if res is not None and gate is not None:
                gate.mark_sent(res)
        if held > self.clock.now():
            await self.clock.sleep(held - self.clock.now())
        if hooked:
            by = self.clock.now() + self.settings.arrival_guard_s
            for gate, res in ((self.rpm, rpm_res), (self.tpm, tpm_res)):
                if res is not None and gate is not None:
                    gate.mark_arrived(res, by)
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

    def _pre_write(self, recorded: RecordedCall) -> float | None:
        """``pre_write`` for a call that waited at a gate (and so may have been held)."""
        return self.pre_write if waited_at_a_gate(recorded) else None

    async def _wait(self, seconds: float) -> None:
        """A bare future on a timer (asyncio.sleep does more)."""
        loop = self.loop
        future = loop.create_future()
        loop.call_at(loop.time() + seconds, future.set_result, None)
        await future

    async def _client_cpu(self) -> None:
        """The client's own work on the attempt, one attempt at a time (``client_cpu_s``)."""
        assert self.cpu is not None
        now = self.loop.time()
        start = self.cpu_free if self.cpu_free > now else now
        self.cpu_free = start + self.cpu
        await self._wait(self.cpu_free - now)

    async def scripted(self, index: int, recorded: RecordedCall) -> None:
        """Every attempt as recorded, up to ``max_attempts``.

        The first attempt's path (gates, permit, send, answer) is inlined: one coroutine per
        call instead of several, for speed; retries take the same steps through the methods.
        """
        try:
            attempts = recorded.attempts
            if not attempts:
                await self._unsent(index, recorded)
                return
            run, rpm, tpm, loop, sem = self.run, self.rpm, self.tpm, self.loop, self.sem
            cpu, max_attempts = self.cpu, self.settings.max_attempts
            pre_write = self._pre_write(recorded)
            admitted = await self._admit(index, recorded)
            if admitted is None:
                return
            rpm_res, tpm_res = admitted
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
                    if attempt.pre_send_s and cpu is None:
                        await self._wait(attempt.pre_send_s)
                    await self._send(rpm_res, tpm_res, attempt.body_sent_s is not None)
                    if cpu is not None:
                        await self._client_cpu()
                        seconds = attempt_time(attempt, True)
                    else:  # the recorded latency, less any hold at the wire (attempt_time)
                        seconds = attempt_time(attempt, False, pre_write)
                    future = loop.create_future()
                    loop.call_at(loop.time() + seconds, future.set_result, None)
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
                if answered or attempt.wait_s is None or n >= max_attempts:
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

    def _retry_wait(self, n: int, exc: ProviderError) -> float | None:
        """The production policy's wait after attempt ``n`` failed with ``exc`` (None: stop)."""
        policy = self.policy
        if n >= policy.max_attempts or not policy.should_retry(exc):
            return None
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = n
        state.set_exception((type(exc), exc, None))
        return policy.wait_for(state)

    async def modelled_call(self, index: int, recorded: RecordedCall) -> None:
        """Each attempt's outcome drawn: the provider's limit, then the recorded faults."""
        try:
            if not recorded.attempts:
                await self._unsent(index, recorded)
                return
            admitted = await self._admit(index, recorded)
            if admitted is None:
                return
            rpm_res, tpm_res = admitted
            provider, clock, run, faults = self.provider, self.clock, self.run, self.faults
            cpu = self.cpu is not None
            answer = next((a for a in recorded.attempts if a.error_type is None), None)
            pre_send = 0.0 if cpu else recorded.attempts[0].pre_send_s
            pre_write = self._pre_write(recorded)
            charge = recorded.tpm_counted
            answered = reached = False
            error: str | None = None
            n = 0
            while True:
                n += 1
                rpm_res = await self._permit(index, n, rpm_res)
                retry_wait: float | None = None
                try:
                    if pre_send:
                        await self._wait(pre_send)
                    await self._send(rpm_res, tpm_res, self.hooked)
                    if cpu:
                        await self._client_cpu()
                    reached = True
                    now = clock.now()
                    within, retry_after = (True, None)
                    if provider is not None:
                        within, retry_after = provider.check(now, charge)
                    fault = None if not within else faults.draw(self.rng.random())
                    if not within:  # the provider's limit: a 429 with its own retry-after
                        run.rate_limited += 1
                        error = _RATE_LIMITED
                        await self._wait(self.settings.provider_429_latency_s)
                        self._observe()
                        self._mark_done(rpm_res, tpm_res, True)
                        exc = ProviderError(
                            ErrorType.RATE_LIMITED,
                            "modelled provider rate limit",
                            retryable=True,
                            status=429,
                            retry_after_s=retry_after,
                        )
                        retry_wait = self._retry_wait(n, exc)
                    elif fault is None:  # answered
                        if provider is not None:
                            provider.count(now, charge)
                        seconds = (
                            attempt_time(answer, cpu, pre_write)
                            if answer is not None
                            else self.rng.choice(self.answer_times)
                        )
                        await self._wait(seconds)
                        self._observe()
                        self._mark_done(rpm_res, tpm_res, True)
                        answered = True
                    else:  # a recorded kind of error; a 429 of its own is not counted
                        error = fault.error_type
                        if error == _RATE_LIMITED:
                            run.rate_limited += 1
                        elif provider is not None:
                            provider.count(now, charge)
                        await self._wait(fault.latency_s)
                        if fault.status is not None:
                            self._observe()
                        self._mark_done(rpm_res, tpm_res, fault.status is not None)
                        exc = ProviderError(
                            _error_type(error),
                            "recorded provider error",
                            retryable=fault.retryable,
                            status=fault.status,
                            retry_after_s=fault.retry_after_s,
                        )
                        retry_wait = self._retry_wait(n, exc)
                finally:
                    self.sem.release()
                if answered or retry_wait is None:
                    break
                await clock.sleep(retry_wait)
            self._settle(recorded, rpm_res, tpm_res, answered, reached)
            if answered:
                if answer is None:
                    run.synthesized += 1  # answered, but its tokens were never recorded
                else:
                    run.answered.append(recorded)
                self._finish(index, "succeeded", None)
            else:
                self._finish(index, "failed", error)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _observe(self) -> None:
        """What production does with the x-ratelimit-* headers of every answer."""
        if self.provider is None:
            return
        requests, tokens, reset = self.provider.headers(self.clock.now())
        if self.rpm is not None:
            self.rpm.observe_provider(requests, reset)
        if self.tpm is not None:
            self.tpm.observe_provider(tokens, reset)

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

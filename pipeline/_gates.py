"""In-process sliding-window rate gates (RPM and TPM share this one class).

Invariants:
- ``acquire`` is one atomic check-and-reserve: between the check and the reservation there is
  no ``await``, so two callers can never both see the last free slot.
- Waiters are served strictly first-in, first-out. Only the head waiter is ever considered and
  one timer is armed for the moment it can fit, so there is no thundering herd.
- The window rule. The provider counts a request when it *arrives* and keeps it for one window.
  A reservation is *pending* until :meth:`SlidingWindowGate.mark_sent`; pending units count
  and never expire. A sent slot has no window end while the gate knows no time by which its
  request arrived. :meth:`~SlidingWindowGate.mark_arrived` gives such a time, ``by``, and the
  window then ends at ``by + window``: the caller passes ``body_sent + arrival_guard_s`` when
  the HTTP transport reports the body written (one assumption: a request reaches the provider
  within ``arrival_guard_s`` of its last byte being handed to the OS), and
  :meth:`~SlidingWindowGate.mark_done` passes the end of the attempt (an answer proves the
  arrival) plus ``unanswered_guard_s`` when there was no answer. Every bound may be given; the
  earliest wins and a window end never moves later. An optional ``send_guard_s`` ends a sent
  slot at ``send + send_guard_s + window`` without any proof, for users who prefer throughput
  on very slow calls without the hook.
- The provider's ``x-ratelimit-remaining-*`` headers correct the view both ways
  (:meth:`~SlidingWindowGate.observe_provider`): less room than ours is held back as a
  *deficit* until the reset (someone else uses the key); more room frees our oldest units that
  certainly arrived before the report, never more than the provider says are gone.
- Grant ahead (``lead_s`` > 0, set by a caller that holds each request until its
  reservation's ``not_before``): a waiter may be granted up to ``lead_s`` before its units fit.
  Pending units never expire, so each such grant is counted by the next one's fit time.
- Cancellation anywhere leaves nothing behind: a cancelled waiter is removed, and a grant that
  raced with the cancellation is given back.
- ``used() == pending + sent-and-unexpired``, always; ``used() <= capacity`` after any grant
  that fits now; a grant made ahead exceeds it until its ``not_before``, and a reconciliation
  that raised a reservation above its estimate until the window has room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ._errors import ConfigurationError
from .typing import Clock, TimerHandle

__all__ = [
    "DEFAULT_ARRIVAL_GUARD_S",
    "GateRequestTooLarge",
    "GateReservation",
    "SlidingWindowGate",
    "parse_reset",
    "provider_count",
]

#: Seconds within which a request whose body was written reaches the provider's rate limiter
#: (README, "How the gates work"). It covers the network's one-way delay and the provider's
#: front door; widen it (``arrival_guard_s=``) for a slow or lossy network.
DEFAULT_ARRIVAL_GUARD_S = 0.1
# How far ahead of the moment its units fit a gate may grant an attempt, once the send-time hook
# has shown it can hold the request until then (see SlidingWindowGate.acquire): the SDK's own
# time from the grant to the write (tens of ms on a busy host) is then not lost per slot.
GRANT_LEAD_S = 0.1

_PENDING, _SENT, _DONE = 0, 1, 2
# Added to every window end: the provider's clock ticks on its own and a boundary tie must
# not be decided in our favour.
_EPSILON_S = 0.001
_SEQUENCE = itertools.count()
_WALKS_PER_WINDOW = 100  # the most times a window's units are walked for a provider's credit


class GateRequestTooLarge(Exception):
    """The request needs more units than the gate's whole window holds: it could never pass."""

    def __init__(self, gate: str, amount: int, capacity: int) -> None:
        super().__init__(
            f"the {gate} gate holds {capacity} per window but this call needs {amount}: it can "
            f"never be admitted; lower max_output_tokens or shorten the prompt, or raise max_{gate}"
        )
        self.gate = gate
        self.amount = amount
        self.capacity = capacity


@dataclass(slots=True, eq=False)
class GateReservation:
    amount: int
    state: int = _PENDING
    expires_at: float = 0.0
    waited_s: float = 0.0
    waiters_ahead: int = 0
    # Granted ahead (acquire's lead_s): the request must not leave before this clock time.
    not_before: float = -math.inf

    @property
    def pending(self) -> bool:
        """Reserved but not sent: counts against the window and never expires."""
        return self.state == _PENDING

    @property
    def done(self) -> bool:
        """Expired or released: no longer counts."""
        return self.state == _DONE


class SlidingWindowGate:
    """``capacity`` units per rolling ``window_s`` seconds."""

    def __init__(
        self,
        name: str,
        capacity: int,
        window_s: float,
        *,
        clock: Clock,
        send_guard_s: float | None = None,
    ) -> None:
        if capacity < 1:
            raise ConfigurationError(
                f"{name} gate capacity is {capacity}: the limit times rpm_window_seconds / 60 "
                "must allow at least 1 per window; raise the limit or the window"
            )
        if window_s <= 0:
            raise ConfigurationError(f"{name} gate window is {window_s}s: use a window > 0")
        self.name = name
        self.capacity = capacity
        self.window_s = window_s
        self._clock = clock
        self._guard = send_guard_s
        # Sent reservations as a heap of (expires_at, seq, reservation). An entry whose
        # expires_at no longer matches its reservation's is stale (lowered by mark_done, or
        # released) and is skipped when it surfaces: lazy deletion keeps every update O(log n).
        self._log: list[tuple[float, int, GateReservation]] = []
        self._sent_units = 0
        self._pending_units = 0
        self._waiters: deque[tuple[int, asyncio.Future[GateReservation]]] = deque()
        # Grant ahead: up to lead_s before units fit, with not_before set to when they do. Set
        # by a caller that holds each request until its not_before (the call flow does, once
        # its send-time hook has reported a write); 0 grants only what fits now.
        self.lead_s = 0.0
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0
        # What the provider's x-ratelimit headers told us, when it has less room than we think.
        # Units the provider says are in use beyond what we count (another client, a restart),
        # held back until its reset time. Holding back only the deficit, not capping at
        # "remaining", lets our own expiring units free room as usual: a late report can
        # then never freeze the gate for a whole window.
        self._provider_deficit = 0
        self._provider_until = 0.0
        # Units that ended in the last window, (end, amount) in end order: a report made
        # before they ended still counted them (see observe_provider).
        self._ended: deque[tuple[float, int]] = deque()
        self._next_walk = -math.inf  # see observe_provider

    # -- acquiring ----------------------------------------------------------------------

    async def acquire(self, amount: int) -> GateReservation:
        """Reserve ``amount`` units, waiting FIFO until they fit (or, with :attr:`lead_s`,
        until they fit within ``lead_s``: the reservation's ``not_before`` then says when)."""
        if amount > self.capacity:
            raise GateRequestTooLarge(self.name, amount, self.capacity)
        clock = self._clock
        start = clock.now()
        if not self._waiters:
            not_before = self._fit_time(amount, start)
            if not_before is not None:
                return self._take(amount, not_before)
        future: asyncio.Future[GateReservation] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        ahead = len(self._waiters)
        self._waiters.append(entry)
        self._pump()
        try:
            reservation = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same tick as the cancellation: give the units back.
                self.release(future.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._pump()
            raise
        reservation.waited_s = clock.now() - start
        reservation.waiters_ahead = ahead
        return reservation

    def _take(self, amount: int, not_before: float) -> GateReservation:
        self._pending_units += amount
        return GateReservation(amount, not_before=not_before)

    def _fit_time(self, amount: int, now: float) -> float | None:
        """When ``amount`` fits: ``-inf`` if now (no hold), the moment enough sent units
        expire if that is within :attr:`lead_s`, or None. Pending units count as never expiring,
        so each grant made ahead is counted by the next one's computation. No lead while the
        provider's deficit holds (when it lapses is not when a unit fits)."""
        if self._fits(amount, now):
            return -math.inf
        if self.lead_s <= 0 or self._provider_deficit:
            return None
        when = self._next_fit_time(amount, now)
        return when if when is not None and when <= now + self.lead_s else None

    def _expire(self, now: float) -> None:
        log = self._log
        while log:
            expires_at, _, top = log[0]
            if top.state != _SENT or top.expires_at != expires_at:
                heapq.heappop(log)  # stale: keep the top live, so _next_fit_time can read it
            elif expires_at <= now:
                heapq.heappop(log)
                top.state = _DONE
                self._sent_units -= top.amount
                self._ended.append((expires_at, top.amount))
            else:
                break
        ended = self._ended
        while ended and ended[0][0] <= now - self.window_s:
            ended.popleft()  # older than any report still worth reading
        if self._provider_deficit and now >= self._provider_until:
            self._provider_deficit = 0

    def _fits(self, amount: int, now: float) -> bool:
        self._expire(now)
        used = self._pending_units + self._sent_units + self._provider_deficit
        return used + amount <= self.capacity

    def _pump(self) -> None:
        """Grant head waiters while they fit; arm one timer for when the head can fit."""
        waiters = self._waiters
        if not waiters:
            return
        now = self._clock.now()
        while waiters:
            amount, future = waiters[0]
            if future.done():  # cancelled while queued
                waiters.popleft()
                continue
            not_before = self._fit_time(amount, now)
            if not_before is None:
                break
            waiters.popleft()
            future.set_result(self._take(amount, not_before))
        if waiters:
            when = self._next_fit_time(waiters[0][0], now)
            if when is not None and self.lead_s > 0 and not self._provider_deficit:
                when -= self.lead_s  # later than now: _fit_time granted whatever fits sooner
            self._arm(when)

    def _next_fit_time(self, amount: int, now: float) -> float | None:
        """When ``amount`` may fit: the earlier of the provider's reset (if it reported a
        deficit) and the moment enough of our sent units expire. None if only an answer
        (``mark_done``) or a release can make room. Waking early is harmless: the pump
        re-checks and re-arms."""
        candidates: list[float] = []
        if self._provider_deficit:
            candidates.append(self._provider_until)
        excess = (
            self._pending_units + self._sent_units + self._provider_deficit + amount - self.capacity
        )
        log = self._log
        if excess > 0 and log:
            if log[0][2].amount >= excess:  # the common case: O(1)
                candidates.append(log[0][0])
            else:
                # Walk the heap in expiry order, widening the look-ahead only as needed.
                freed, seen, width = 0, 0, 16
                while seen < len(log):
                    for expires_at, _, reservation in heapq.nsmallest(width, log)[seen:]:
                        seen += 1
                        if reservation.state != _SENT or reservation.expires_at != expires_at:
                            continue  # stale entry
                        freed += reservation.amount
                        if freed >= excess:
                            candidates.append(expires_at)
                            break
                    if freed >= excess:
                        break
                    width *= 4
        return min(candidates) if candidates else None

    def _arm(self, when: float | None) -> None:
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return  # an earlier timer re-arms on firing
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    # -- after acquiring ----------------------------------------------------------------

    def mark_sent(self, reservation: GateReservation) -> None:
        """The attempt is being handed to the SDK: it counts until a bound on its arrival is
        known (:meth:`mark_arrived`, :meth:`mark_done`), or ``send_guard_s`` if set."""
        if reservation.state != _PENDING:
            return
        self._pending_units -= reservation.amount
        reservation.state = _SENT
        self._sent_units += reservation.amount
        if self._guard is None:
            # In flight with no end yet: counted in _sent_units but kept out of the heap, so
            # the heap holds only entries that can expire (and does not grow by one stale
            # never-expiring entry per call).
            reservation.expires_at = math.inf
        else:
            reservation.expires_at = self._clock.now() + self._guard + self.window_s + _EPSILON_S
            heapq.heappush(self._log, (reservation.expires_at, next(_SEQUENCE), reservation))
        if self._waiters:
            self._pump()

    def mark_arrived(self, reservation: GateReservation, by: float) -> None:
        """The request reached the provider no later than ``by`` (clock time, may be in the
        future): its window ends at ``by + window``. Lowers the end, never raises it."""
        if reservation.state != _SENT:
            return
        ends = by + self.window_s + _EPSILON_S
        if ends < reservation.expires_at:
            reservation.expires_at = ends
            heapq.heappush(self._log, (ends, next(_SEQUENCE), reservation))
            if self._waiters:
                self._pump()

    def mark_done(self, reservation: GateReservation, *, unanswered_guard_s: float = 0.0) -> None:
        """The attempt is over. With an answer, the request arrived by now; without one
        (timeout, dropped, cancelled) it may still arrive, so the caller passes a guard.
        Idempotent; never moves a window end later (an earlier :meth:`mark_arrived` stands)."""
        self.mark_arrived(reservation, self._clock.now() + unanswered_guard_s)

    def release(self, reservation: GateReservation) -> None:
        """Give the units back: the provider never counted them."""
        if reservation.state == _PENDING:
            self._pending_units -= reservation.amount
        elif reservation.state == _SENT:
            self._sent_units -= reservation.amount  # its heap entry is now stale
        reservation.state = _DONE
        if self._waiters:
            self._pump()

    def reconcile(self, reservation: GateReservation, actual: int) -> None:
        """Replace the estimate with what the provider really counted."""
        delta = actual - reservation.amount
        if delta == 0:
            return
        if reservation.state == _PENDING:
            self._pending_units += delta
        elif reservation.state == _SENT:
            self._sent_units += delta
        reservation.amount = actual
        if delta < 0 and self._waiters:
            self._pump()

    def observe_provider(
        self,
        remaining: int | None,
        reset_s: float | None,
        *,
        as_of: float | None = None,
        limit: int | None = None,
    ) -> None:
        """Correct the local view with the provider's ``remaining`` / ``reset`` headers.

        Less room than ours: someone else uses this key; the difference (the *deficit*) is held
        back until the reset, while our own units still expire as usual.

        More room than ours (``as_of``: a time before which the answering request had not
        arrived, e.g. when its attempt was sent; ``limit``: the provider's per-minute limit, its
        ``x-ratelimit-limit-*`` header): the provider counts ``limit x window / 60 - remaining``
        units in its window (the same window as the gate's, as ``rpm_window_seconds`` says), and
        our units whose arrival bound is at or before ``as_of`` are in that count unless the
        provider already let them go. Units beyond the count are gone at the provider: free
        that many of them, oldest window end first. What stays then covers, at every later
        moment, whatever of them the provider can still count, since no unit of ours ends at
        the provider later than here.
        """
        if remaining is None or reset_s is None:
            return
        now = self._clock.now()
        self._expire(now)
        remaining = max(remaining, 0)
        ours = self._pending_units + self._sent_units
        if as_of is not None:
            # The report was made after as_of: compare with what we held then. Units that
            # ended since would make a report that is merely late look like less room.
            if as_of < now - self.window_s:
                return  # older than a window: nothing in it is still worth believing
            ours += sum(amount for end, amount in self._ended if end > as_of)
        if self.capacity - remaining > ours:
            self._provider_deficit = self.capacity - remaining - ours
            self._provider_until = now + max(reset_s, 0.0) + _EPSILON_S
            return
        # A newer report with no unexplained usage: whoever else used the key has stopped.
        self._provider_deficit = 0
        # Only worth a walk over the log when someone waits for room and the provider counts
        # fewer than we hold as sent (an upper bound of what can be freed); and at most 100
        # walks per window, so that a large window full of units costs little per answer.
        if as_of is None or limit is None or not self._waiters or now < self._next_walk:
            return
        counted = provider_count(limit, remaining, self.window_s)
        if 0 <= counted < self._sent_units:
            self._next_walk = now + self.window_s / _WALKS_PER_WINDOW
            self._free_beyond(counted, as_of + self.window_s + _EPSILON_S)

    def _free_beyond(self, counted: int, arrived_end: float) -> None:
        """Free the oldest sent units whose window ends by ``arrived_end`` (they arrived before
        the provider's report) while those units exceed ``counted``."""
        arrived = [
            (expires_at, seq, res)
            for expires_at, seq, res in self._log
            if res.state == _SENT and res.expires_at == expires_at and expires_at <= arrived_end
        ]
        excess = sum(res.amount for _, _, res in arrived) - counted
        if excess <= 0:
            return
        arrived.sort()
        for _, _, res in arrived:
            if res.amount > excess:
                break  # only a prefix in end order may go: the rest must cover the count
            excess -= res.amount
            self._sent_units -= res.amount
            res.state = _DONE  # its heap entry is now stale
        if self._waiters:
            self._pump()

    def preload(self, sent_ages: Iterable[tuple[float, int]], *, guard_s: float = 1.0) -> int:
        """Warm start: count sends that happened ``age`` seconds ago, as if each arrived up to
        ``guard_s`` after it was sent (their answers are not known here)."""
        now = self._clock.now()
        loaded = 0
        for age, amount in sent_ages:
            expires = now - age + guard_s + self.window_s + _EPSILON_S
            if expires <= now or amount <= 0:
                continue
            entry = GateReservation(amount, _SENT, expires)
            heapq.heappush(self._log, (expires, next(_SEQUENCE), entry))
            self._sent_units += amount
            loaded += 1
        return loaded

    # -- figures ------------------------------------------------------------------------

    def used(self) -> int:
        self._expire(self._clock.now())
        return self._pending_units + self._sent_units

    def reserved(self) -> int:
        """Units reserved by calls that have not been sent yet."""
        return self._pending_units

    def waiting(self) -> int:
        return sum(1 for _, future in self._waiters if not future.done())


def provider_count(limit: int, remaining: int, window_s: float) -> int:
    """Units the provider counts in its window: its per-minute ``limit`` scaled to the window
    (floored, as the gates' capacity is) less ``remaining``; negative when the provider's
    window is not the gate's (a report to ignore)."""
    return math.floor(limit * window_s / 60 + 1e-9) - max(remaining, 0)


_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total = 0.0
    matched = False
    for number, unit in _RESET_PART.findall(value):
        matched = True
        total += float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return total if matched else None

"""Rate gates shared by many processes and hosts through Redis (``rate_limit_url="redis://..."``).

:class:`RedisSlidingWindowGate` has the semantics of the in-process
:class:`~pipeline._gates.SlidingWindowGate`, with the budget held in Redis so that every replica
using one API key draws from one window. Invariants:

- Check-and-reserve is one Lua script (atomic on the server) and reads Redis ``TIME``, so every
  host shares one clock. Units whose window end is known live in a sorted set scored by that
  end; pending units (and, with ``send_guard_s=None``, units in flight until ``mark_done``) in
  a sorted set scored by a *lease* that the owning process renews every ``heartbeat_s``. A
  process that dies holding them blocks them for one lease at most (default
  ``max(2 * window_s, 30 s)``), never forever; a live process keeps them as long as it needs.
- Window ends follow the in-process gate: ``send + send_guard_s + window`` at ``mark_sent``
  when a guard is set, lowered by ``mark_arrived`` to ``by + window`` (``by``: body written +
  ``arrival_guard_s``, or the end of the attempt + its guard through ``mark_done``), never
  raised. There is no grant ahead (``lead_s`` is ignored). Local times are carried to Redis
  as "so long ago" and applied to Redis ``TIME``.
- Arrival order: a waiter takes a ticket (``HINCRBY``) into a queue; only the head ticket may
  reserve, and the fast path is taken only when the queue is empty. Tickets carry a lease too, so
  a dead waiter is skipped after ``queue_lease_s``. The head sleeps exactly until it can fit (the
  script computes it) or until a pub/sub message names its ticket (a release, a send, a new head).
- ``mark_sent``, ``mark_done``, ``release``, ``reconcile``, ``observe_provider`` and ``preload``
  are sync (the service calls ``release`` from cancellation cleanup, where awaiting is unsafe):
  they update local state at once and queue the Redis work for one worker task per gate, which
  applies queued operations in order, many per round trip, and retries them while Redis is
  unreachable (each is idempotent). :meth:`aclose` drains it.
- A provider report of less room than ours holds back the difference (the *deficit*) until its
  reset; units ending meanwhile still free room (see :meth:`observe_provider`).
- A cancelled waiter leaves nothing behind: a script call in flight is shielded and, if it
  granted or queued anything, that is given back when it lands; a queued ticket is removed.
- Redis unreachable: ``fallback="fail_closed"`` raises :class:`RateLimitBackendUnavailable`;
  ``fallback="local"`` serves from a local gate holding ``capacity // replicas`` (one warning),
  probes Redis every ``probe_s`` and, on return, carries its local units into Redis plus a
  placeholder for the other replicas' local shares for one window, so the budget is never
  exceeded while replicas switch back one by one.
- Keys: ``llmtrail:gate:{name}:{{key}}:<part>``; the braces are a Redis Cluster hash tag so one
  gate's keys share a slot. All keys of a gate expire together when it is idle.
- Only the shared window is in Redis: :meth:`used` is its count at the last round trip,
  :meth:`reserved` and :meth:`waiting` are this process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

from ._errors import ConfigurationError, ServiceClosedError, require_extra
from ._gates import (
    _DONE,
    _PENDING,
    _SENT,
    GateRequestTooLarge,
    GateReservation,
    SlidingWindowGate,
    provider_count,
)
from ._redis_scripts import KEY_PARTS
from ._redis_worker import (
    RateLimitBackendUnavailable,
    RedisGateIO,
    RedisGateReservation,
    mask_url,
    unavailable_errors,
)
from .typing import Clock

__all__ = [
    "RateLimitBackendUnavailable",
    "RedisGateReservation",
    "RedisSlidingWindowGate",
    "create_gate",
    "mask_url",
]

Fallback = Literal["fail_closed", "local"]
_FALLBACKS = ("fail_closed", "local")


class RedisSlidingWindowGate(RedisGateIO):
    """``capacity`` units per rolling ``window_s`` seconds, shared through Redis.

    Every replica must use the same ``capacity`` and ``window_s`` for one ``key``. The gate's
    timing is Redis server time and real sleeps, so ``clock`` only measures waits and drives the
    local fallback gate. Methods must be called on the event loop that awaits ``acquire``.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        window_s: float,
        *,
        url: str,
        key: str,
        clock: Clock,
        send_guard_s: float | None = None,
        fallback: Fallback = "fail_closed",
        replicas: int = 1,
        pending_lease_s: float | None = None,
        queue_lease_s: float = 5.0,
        probe_s: float = 1.0,
        connect_timeout_s: float = 2.0,
        command_timeout_s: float = 5.0,
    ) -> None:
        if capacity < 1:
            raise ConfigurationError(
                f"{name} gate capacity is {capacity}: the limit times rpm_window_seconds / 60 "
                "must allow at least 1 per window; raise the limit or the window"
            )
        if window_s <= 0:
            raise ConfigurationError(f"{name} gate window is {window_s}s: use a window > 0")
        if fallback not in _FALLBACKS:
            raise ConfigurationError(
                f"rate_limit_fallback={fallback!r} is invalid: use 'fail_closed' or 'local'"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ConfigurationError(
                f"rate_limit_replicas={replicas!r} is invalid: use the number of processes "
                "sharing this budget (an int >= 1)"
            )
        if fallback == "local" and capacity // replicas < 1:
            raise ConfigurationError(
                f"the {name} gate holds {capacity} per window, too little to split across "
                f"{replicas} replicas for rate_limit_fallback='local'; use 'fail_closed', fewer "
                "replicas, or a longer rpm_window_seconds"
            )
        self.name = name
        self.capacity = capacity
        self.window_s = window_s
        self.url = url
        self.key = key
        self.fallback = fallback
        self.replicas = replicas
        self.lead_s = 0.0  # see acquire
        self._next_walk = 0.0  # see observe_provider
        self._clock = clock
        self._guard = send_guard_s
        self._pending_lease_s = (
            pending_lease_s if pending_lease_s is not None else max(2.0 * window_s, 30.0)
        )
        self._queue_lease_s = queue_lease_s
        self._heartbeat_s = min(1.0, self._pending_lease_s / 3, queue_lease_s / 3)
        self._probe_s = probe_s
        # Waiters are woken by messages; polling only covers a lost one (a pub/sub reconnect).
        # Frequent polls by every queued waiter would cost more CPU than the calls themselves.
        self._poll_s = min(max(window_s, 0.2), 1.0)
        self._timeouts = (connect_timeout_s, command_timeout_s)
        base = f"llmtrail:gate:{name}:{{{key}}}"
        self._keys = [f"{base}:{part}" for part in KEY_PARTS]
        self._channel = f"{base}:wake"
        lease_ms = max(self._pending_lease_s, queue_lease_s, window_s + (send_guard_s or 1.0))
        self._ttl_ms = int(2000 * lease_ms) + 1000
        self._client = None
        self._scripts = {}
        self._local = (
            SlidingWindowGate(
                name, capacity // replicas, window_s, clock=clock, send_guard_s=send_guard_s
            )
            if fallback == "local"
            else None
        )
        self._on_local = False
        self._local_live: set[RedisGateReservation] = set()
        # Held in Redis under a lease this process renews: pending, or in flight without a
        # known window end (send_guard_s None, until mark_done).
        self._leased: set[RedisGateReservation] = set()
        self._pending_units = 0  # of the leased ones not sent yet
        self._waiters = 0
        self._tickets: dict[int, asyncio.Event] = {}
        self._used = 0  # Redis's count at the last round trip
        self._ops: deque[tuple[str, tuple[Any, ...], float]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closed = False

    # -- acquiring ----------------------------------------------------------------------

    async def acquire(self, amount: int) -> RedisGateReservation:
        """Reserve ``amount`` units in the shared window, FIFO across every process.

        :attr:`lead_s` is kept for the in-process gate's interface and not used: a shared gate
        never grants ahead (its grants carry no ``not_before``).
        """
        if amount > self.capacity:
            raise GateRequestTooLarge(self.name, amount, self.capacity)
        if self._closing:
            raise ServiceClosedError(f"the {self.name} gate is closed; create a new one")
        start = self._clock.now()
        self._waiters += 1
        try:
            if not self._on_local:
                try:
                    return await self._acquire_shared(amount, start)
                except unavailable_errors() as exc:
                    if self._local is None:
                        raise RateLimitBackendUnavailable(
                            self.name, mask_url(self.url), exc
                        ) from exc
                    self._go_local(exc)
            return await self._acquire_local(amount, start)
        finally:
            self._waiters -= 1

    async def _acquire_local(self, amount: int, start: float) -> RedisGateReservation:
        assert self._local is not None
        inner = await self._local.acquire(amount)
        res = RedisGateReservation(amount, rid=os.urandom(8).hex(), inner=inner)
        res.waited_s = self._clock.now() - start
        res.waiters_ahead = inner.waiters_ahead
        self._local_live.add(res)
        return res

    async def _acquire_shared(self, amount: int, start: float) -> RedisGateReservation:
        res = RedisGateReservation(amount, rid=os.urandom(8).hex())
        ticket = 0  # our place in the shared queue, once we have one
        ahead = 0
        event = asyncio.Event()  # set by the listener when a message names our ticket
        try:
            while True:
                event.clear()
                call = self._spawn(
                    self._run(
                        "acquire",
                        res.rid,
                        amount,
                        ticket,
                        self.capacity,
                        int(self._pending_lease_s * 1000),
                        int(self._queue_lease_s * 1000),
                    )
                )
                try:
                    granted, wait_ms, used, rank, got = await asyncio.shield(call)
                except asyncio.CancelledError:
                    # The script may still run, or have run: clean up once the call has landed.
                    call.add_done_callback(functools.partial(self._abandoned, res.rid, ticket))
                    self._tickets.pop(ticket, None)
                    ticket = 0
                    raise
                self._used = int(used)
                if granted:
                    break
                if ticket == 0:
                    ticket, ahead = int(got), int(rank)
                    self._tickets[ticket] = event
                    self._ensure_listener()
                    self._ensure_worker()  # its heartbeats keep the ticket's lease
                if wait_ms >= 0 and rank == 0:
                    timeout = wait_ms / 1000 + random.uniform(0.0005, 0.002)
                else:  # a message wakes us; polling only covers a lost one
                    timeout = self._poll_s * random.uniform(0.8, 1.2)
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
                # lands as the event is set, and a cancelled waiter would then wait on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await event.wait()
        except BaseException:
            if ticket:  # cancelled while asleep, or Redis failed: leave the queue
                self._tickets.pop(ticket, None)
                self._enqueue("leave", ticket)
            raise
        self._tickets.pop(ticket, None)  # the script removed a granted ticket itself
        res.waited_s = self._clock.now() - start
        res.waiters_ahead = ahead
        self._leased.add(res)
        self._pending_units += amount
        self._ensure_worker()
        return res

    def _abandoned(self, rid: str, ticket: int, call: asyncio.Task[Any]) -> None:
        """A cancelled waiter's script call landed: give back whatever it took."""
        if call.cancelled() or call.exception() is not None:
            if ticket:
                self._enqueue("leave", ticket)
            return
        granted, _, _, _, got = call.result()
        if granted:
            self._enqueue("release", rid)
        elif int(got):
            self._enqueue("leave", int(got))

    # -- after acquiring (sync: local state now, Redis in order through the worker) --------

    def _shared(self, reservation: GateReservation) -> RedisGateReservation:
        if not isinstance(reservation, RedisGateReservation):
            raise TypeError(
                f"the {self.name} gate got a {type(reservation).__name__}; pass the reservation "
                "this gate's acquire() returned"
            )
        return reservation

    def _mirror(self, res: RedisGateReservation) -> bool:
        """Whether Redis must hear about ``res``: always, unless it and we are both local."""
        return res.inner is None or not self._on_local

    def mark_sent(self, reservation: GateReservation) -> None:
        """The attempt is being handed to the SDK: its window ends by send + guard + window.

        With ``send_guard_s=None`` the window has no end while the attempt is in flight: the
        entry stays under this process's lease in Redis until :meth:`mark_done`.
        """
        res = self._shared(reservation)
        if res.inner is not None:
            self._local_gate().mark_sent(res.inner)
        if res.state != _PENDING:
            return
        if res in self._leased:
            self._pending_units -= res.amount
        res.state = _SENT
        if self._guard is None:
            res.expires_at = math.inf
            return
        self._leased.discard(res)
        res.expires_at = time.monotonic() + self._guard + self.window_s
        if self._mirror(res):
            self._enqueue("settle", res.rid, res.amount, time.monotonic(), self._guard)

    def mark_arrived(self, reservation: GateReservation, by: float) -> None:
        """The request reached the provider no later than ``by`` (clock time, may be in the
        future): its window ends at ``by + window``. Lowers the end, never raises it."""
        res = self._shared(reservation)
        if res.inner is not None:
            self._local_gate().mark_arrived(res.inner, by)
        if res.state != _SENT or res.done:
            return
        ahead_s = by - self._clock.now()  # the gate's own times are time.monotonic()
        ends = time.monotonic() + ahead_s + self.window_s
        if ends >= res.expires_at:
            return
        res.expires_at = ends
        self._leased.discard(res)
        if self._mirror(res):
            self._enqueue("settle", res.rid, res.amount, time.monotonic(), ahead_s)

    def mark_done(self, reservation: GateReservation, *, unanswered_guard_s: float = 0.0) -> None:
        """The attempt is over: with an answer the request has arrived by now; without one
        (timeout, dropped, cancelled) it may still arrive and the caller passes a guard.
        Idempotent; an earlier :meth:`mark_arrived` stands."""
        self.mark_arrived(reservation, self._clock.now() + unanswered_guard_s)

    def release(self, reservation: GateReservation) -> None:
        """Give the units back: the provider never counted them."""
        res = self._shared(reservation)
        if res.inner is not None:
            self._local_gate().release(res.inner)
            self._local_live.discard(res)
        if res.state == _DONE:
            return
        self._unlease(res)
        res.state = _DONE
        if self._mirror(res):
            self._enqueue("release", res.rid)

    def reconcile(self, reservation: GateReservation, actual: int) -> None:
        """Replace the estimate with what the provider really counted."""
        res = self._shared(reservation)
        if res.inner is not None:
            self._local_gate().reconcile(res.inner, actual)
        if actual == res.amount:
            return
        if res.state == _PENDING and res in self._leased:
            self._pending_units += actual - res.amount
        res.amount = actual
        if res.state != _DONE and self._mirror(res):
            self._enqueue("reconcile", res.rid, actual)

    def observe_provider(
        self,
        remaining: int | None,
        reset_s: float | None,
        *,
        as_of: float | None = None,
        limit: int | None = None,
    ) -> None:
        """Correct the shared view with the provider's headers, both ways (in one script).

        Less room than ours: the gate holds back the difference (the *deficit*: someone else
        uses this key) until the reported reset; units that end in the meantime still free room,
        since each of our windows ends no earlier than the provider's. A report that is merely
        late (two replicas, a busy loop) then costs a few units for one window rather than
        stalling every replica until the whole window has drained.

        More room than ours, with ``as_of`` (clock time before which the answering request had
        not arrived) and ``limit`` (the provider's per-minute limit): the oldest units that
        certainly arrived before the report and that the provider no longer counts are freed,
        as in :meth:`~pipeline._gates.SlidingWindowGate.observe_provider`.
        """
        if remaining is None or reset_s is None:
            return
        if self._local is not None:
            self._local.observe_provider(remaining // self.replicas, reset_s)
        if not self._on_local:
            now = time.monotonic()
            as_of_mono = None
            counted = -1
            # The credit walks the shared window in Redis: at most 100 times per window.
            if as_of is not None and limit is not None and now >= self._next_walk:
                self._next_walk = now + self.window_s / 100
                as_of_mono = now - (self._clock.now() - as_of)
                counted = provider_count(limit, remaining, self.window_s)
            self._enqueue(
                "observe",
                remaining,
                int(max(reset_s, 0.0) * 1000),
                int((self._guard or 0.0) * 1000),
                self.capacity,
                counted,
                as_of_mono,
                now,
            )

    def preload(self, sent_ages: Iterable[tuple[float, int]], *, guard_s: float = 1.0) -> int:
        """Warm start from the store, applied in Redis only if the shared window is empty.

        Each send counts as if it arrived up to ``guard_s`` after it was sent. The store holds
        every replica's sends, and a live Redis already counts them: loading them again would
        count them twice. After a Redis restart the window is empty, and this is what brings it
        back. Returns how many sends fall inside the window.
        """
        entries: list[Any] = []
        for age, amount in sent_ages:
            remaining = guard_s + self.window_s - age
            if remaining > 0 and amount > 0:
                entries += [f"preload:{os.urandom(6).hex()}", int(remaining * 1000), amount, 0]
        if entries:
            self._enqueue("import", 1, int(self._pending_lease_s * 1000), *entries)
        return len(entries) // 4

    def _unlease(self, res: RedisGateReservation) -> None:
        if res in self._leased:
            self._leased.discard(res)
            if res.state == _PENDING:
                self._pending_units -= res.amount

    def _local_gate(self) -> SlidingWindowGate:
        assert self._local is not None
        return self._local

    # -- figures ------------------------------------------------------------------------

    def used(self) -> int:
        """Units held in the shared window at the last round trip (the local gate's when local)."""
        if self._on_local and self._local is not None:
            return self._local.used()
        return self._used

    def reserved(self) -> int:
        """Units this process reserved and has not sent yet."""
        local = sum(r.amount for r in self._local_live if r.pending)
        return self._pending_units + local

    def waiting(self) -> int:
        """Callers of this process waiting in ``acquire``."""
        return self._waiters

    @property
    def on_local_fallback(self) -> bool:
        """True while Redis is unreachable and the local 1/N gate serves this process."""
        return self._on_local


def create_gate(
    name: str,
    capacity: int,
    window_s: float,
    *,
    clock: Clock,
    send_guard_s: float | None,
    rate_limit_url: str | None,
    key: str,
    fallback: str = "fail_closed",
    replicas: int = 1,
) -> SlidingWindowGate | RedisSlidingWindowGate:
    """The in-process gate when ``rate_limit_url`` is None, else the shared Redis gate.

    ``key`` identifies the budget: ``"{provider}:{model}:{api-key fingerprint}"``.
    """
    if rate_limit_url is None:
        return SlidingWindowGate(name, capacity, window_s, clock=clock, send_guard_s=send_guard_s)
    scheme = urlsplit(rate_limit_url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"rate_limit_url={mask_url(rate_limit_url)!r} is not a Redis URL: use "
            "redis://host:6379/0 (rediss:// for TLS), or None for in-process gates"
        )
    if fallback not in _FALLBACKS:
        raise ConfigurationError(
            f"rate_limit_fallback={fallback!r} is invalid: use 'fail_closed' or 'local'"
        )
    require_extra("redis", "redis", "rate_limit_url (gates shared through Redis)")
    return RedisSlidingWindowGate(
        name,
        capacity,
        window_s,
        url=rate_limit_url,
        key=key,
        clock=clock,
        send_guard_s=send_guard_s,
        fallback=fallback,  # type: ignore[arg-type]
        replicas=replicas,
    )

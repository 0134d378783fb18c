"""The Redis side of :class:`~pipeline._redis_gates.RedisSlidingWindowGate`: connection, the
worker that applies queued operations in order, heartbeats, the probe of the local fallback,
wake-up messages and closing.

:class:`RedisGateIO` is the gate's base class; it holds no state of its own (the gate's
``__init__`` sets every attribute it declares). Invariants (see the gate's module docstring):

- Operations are applied in the order they were queued, many per round trip, and retried while
  Redis is unreachable (each is idempotent); :meth:`RedisGateIO.aclose` drains them.
- Heartbeats renew the leases of pending and in-flight entries and of queued tickets before any
  queued operation, so a steady stream of operations cannot starve them.
- On the local fallback the worker probes Redis every ``probe_s`` and, when it is back, carries
  the local units over (plus a placeholder for the other replicas' local shares for one window).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from llmtrail._log import get_logger

from ._errors import LLMTrailError
from ._gates import _DONE, _PENDING, _SENT, GateReservation, SlidingWindowGate
from ._redis_scripts import register_scripts

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "RateLimitBackendUnavailable",
    "RedisGateIO",
    "RedisGateReservation",
    "mask_url",
    "unavailable_errors",
]

_log = get_logger(__name__)
_OUTAGE_ID = "outage"  # the one placeholder entry for other replicas' local shares
_MAX_CONNECTIONS = 32  # per gate and process: scripts take well under a millisecond
_BATCH = 256  # queued operations applied in one round trip


class RateLimitBackendUnavailable(LLMTrailError):
    """The shared rate gate cannot reach Redis and ``rate_limit_fallback`` is ``fail_closed``."""

    def __init__(self, gate: str, url: str, cause: BaseException) -> None:
        super().__init__(
            f"the {gate} rate gate cannot reach Redis at {url} ({cause}); the call is refused so "
            "that the shared limit is not exceeded (rate_limit_fallback='fail_closed'). Start "
            "Redis or fix rate_limit_url, or set rate_limit_fallback='local' to fall back to "
            "1/N of the budget per process"
        )
        self.gate = gate
        self.url = url


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@dataclass(slots=True, eq=False)
class RedisGateReservation(GateReservation):
    """A reservation of a shared gate; ``inner`` is set when the local fallback granted it."""

    rid: str = ""
    inner: GateReservation | None = None

    @property
    def pending(self) -> bool:
        if self.inner is not None:
            return self.inner.pending
        return self.state == _PENDING

    @property
    def done(self) -> bool:
        if self.inner is not None:
            return self.inner.done
        if self.state == _SENT and time.monotonic() >= self.expires_at:
            self.state = _DONE
        return self.state == _DONE


def unavailable_errors() -> tuple[type[BaseException], ...]:
    from redis import exceptions

    return (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.ReadOnlyError, OSError)


class RedisGateIO:
    """Connection, worker, wake-ups and closing of a shared gate (its base class)."""

    name: str
    capacity: int
    window_s: float
    url: str
    replicas: int
    _clock: Any
    _guard: float | None
    _pending_lease_s: float
    _queue_lease_s: float
    _heartbeat_s: float
    _probe_s: float
    _timeouts: tuple[float, float]
    _keys: list[str]
    _channel: str
    _ttl_ms: int
    _client: Redis | None
    _scripts: dict[str, AsyncScript]
    _local: SlidingWindowGate | None
    _on_local: bool
    _local_live: set[RedisGateReservation]
    _leased: set[RedisGateReservation]
    _pending_units: int
    _tickets: dict[int, asyncio.Event]
    _used: int
    _ops: deque[tuple[str, tuple[Any, ...], float]]
    _wake: asyncio.Event
    _idle: asyncio.Event
    _worker: asyncio.Task[None] | None
    _listener: asyncio.Task[None] | None
    _tasks: set[asyncio.Task[Any]]
    _closing: bool
    _closed: bool

    # -- connection ---------------------------------------------------------------------

    def _redis(self) -> Redis:
        if self._client is None:
            from redis.asyncio import BlockingConnectionPool, Redis

            connect, command = self._timeouts
            # A bounded pool that makes callers queue for a connection: 10,000 concurrent
            # acquires must not open 10,000 connections (redis-py's default pool fails past
            # 100). redis-py does not retry by default: a failed call is retried by the worker
            # (in order) or reported by acquire, never repeated behind our back.
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=_MAX_CONNECTIONS,
                # The wait for a free pooled connection is bounded too: with a Redis that
                # accepts connections and never answers, every pooled connection is stuck in
                # its socket timeout and an unbounded wait would queue callers for minutes
                # (fail_closed then refused almost none). The command timeout is generous for
                # queueing behind healthy scripts (well under a millisecond each).
                timeout=command,
                socket_connect_timeout=connect,
                socket_timeout=command,
            )
            self._client = Redis.from_pool(pool)
            self._scripts = register_scripts(self._client)
        return self._client

    async def _run(self, script: str, *args: Any) -> Any:
        client = self._redis()
        return await self._scripts[script](self._keys, [self._channel, self._ttl_ms, *args], client)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the worker: Redis operations in order, heartbeats, probes -----------------------

    def _enqueue(self, op: str, *args: Any) -> None:
        if self._closed:  # after aclose: nothing to keep in step any more
            return
        self._ops.append((op, args, time.monotonic()))
        self._idle.clear()
        self._wake.set()
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop yet (e.g. preload before start): applied on first use
                return
            self._worker = loop.create_task(self._work())

    async def start(self) -> None:
        """Connect and load the scripts now rather than on the first call.

        Redis unreachable: raises :class:`RateLimitBackendUnavailable` with ``fail_closed``,
        switches to the local share (with the one warning) with ``local``.
        """
        if self._on_local:
            return
        try:
            client = self._redis()
            await client.ping()
            for script in self._scripts.values():
                await client.script_load(script.script)
        except unavailable_errors() as exc:
            if self._local is None:
                raise RateLimitBackendUnavailable(self.name, mask_url(self.url), exc) from exc
            self._go_local(exc)

    async def flush(self) -> None:
        """Return once every operation issued before the call has been applied in Redis.

        That includes the clean-up of waiters cancelled while their script call was in flight.
        While Redis is unreachable this waits until the operations are applied or dropped.
        """
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._ensure_worker()
        while self._ops:
            await self._idle.wait()

    async def _work(self) -> None:
        unavailable = unavailable_errors()
        backoff = 0.05
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            now = time.monotonic()
            if now >= next_beat:  # before the operations, so a steady stream cannot starve it
                next_beat = now + (self._probe_s if self._on_local else self._heartbeat_s)
                try:
                    await (self._probe() if self._on_local else self._renew())
                except unavailable:
                    pass  # retried at the next beat
                except Exception:
                    _log.exception("shared gate heartbeat failed", gate=self.name)
            if self._ops:
                batch = list(itertools.islice(self._ops, _BATCH))
                try:
                    await self._apply(batch)
                except unavailable:
                    while self._ops and time.monotonic() - self._ops[0][2] > self._pending_lease_s:
                        # Moot by now: a pending lease lapsed, a sent entry expired.
                        op = self._ops.popleft()[0]
                        _log.debug("shared gate operation dropped", gate=self.name, op=op)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                except Exception:  # a bug: report it and keep the worker going
                    _log.exception("shared gate operations failed", gate=self.name)
                for _ in batch:
                    self._ops.popleft()
                backoff = 0.05
                continue
            self._idle.set()
            if self._closing or not (self._on_local or self._leased or self._tickets):
                return  # idle: started again by the next operation or acquire
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_beat - now):
                    await self._wake.wait()

    async def _apply(self, batch: list[tuple[str, tuple[Any, ...], float]]) -> None:
        """Apply queued operations in order, in one round trip (a pipeline, not a transaction:
        each script is atomic by itself, and every operation is idempotent, so a batch that
        failed half way is simply applied again)."""
        from redis.exceptions import NoScriptError

        client = self._redis()
        keys = self._keys
        window_ms = int(self.window_s * 1000)
        for _ in range(2):
            # EVALSHA straight into the pipeline: registering the scripts with it would cost
            # a SCRIPT EXISTS round trip per batch. A server that lost its script cache
            # (restarted) answers NOSCRIPT: load them and apply the batch again.
            pipe = client.pipeline(transaction=False)
            for op, args, _ in batch:
                if op == "settle":
                    rid, amount, at, guard_s = args
                    lag_ms = int((time.monotonic() - at) * 1000)
                    # Rounded up: a window end may come out later than asked, never earlier.
                    args = (rid, amount, lag_ms, math.ceil(guard_s * 1000), window_ms)
                elif op == "observe":
                    *head, as_of, at = args
                    mono = time.monotonic()
                    # -1: no as_of; else ms since it, rounded up (an earlier as_of frees less).
                    since_as_of = -1 if as_of is None else math.ceil((mono - as_of) * 1000)
                    args = (*head, int((mono - at) * 1000), since_as_of, window_ms)
                sha = self._scripts[op].sha
                pipe.evalsha(sha, len(keys), *keys, self._channel, self._ttl_ms, *args)
            results = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            for script in self._scripts.values():
                await client.script_load(script.script)
        unavailable = unavailable_errors()
        for (op, _, _), result in zip(batch, results, strict=True):
            if isinstance(result, unavailable):
                raise result
            if isinstance(result, Exception):
                _log.error("shared gate operation failed", gate=self.name, op=op, error=str(result))
            elif op != "import":  # every other script returns the shared count
                self._used = int(result)

    async def _renew(self) -> None:
        leased = [x for r in self._leased for x in (r.rid, r.amount)]
        if not leased and not self._tickets:
            return
        self._used = int(
            await self._run(
                "renew",
                int(self._pending_lease_s * 1000),
                int(self._queue_lease_s * 1000),
                len(leased) // 2,
                *leased,
                *self._tickets,
            )
        )

    async def _probe(self) -> None:
        """On the local fallback: is Redis back? Then carry our units over and switch back."""
        await self._redis().ping()
        now = self._clock.now()
        entries: list[Any] = []
        for res in list(self._local_live):
            inner = res.inner
            if inner is None or inner.done:
                self._local_live.discard(res)
                continue
            if inner.pending or math.isinf(inner.expires_at):  # no window end yet: leased
                entries += [res.rid, 1, res.amount, 1]
            else:
                entries += [res.rid, int((inner.expires_at - now) * 1000) + 1, res.amount, 0]
        others = (self.replicas - 1) * (self.capacity // self.replicas)
        if others:
            # The other replicas may still be on their local share until their own probe.
            hold_ms = int((self.window_s + (self._guard or 1.0) + 2 * self._probe_s) * 1000)
            entries += [_OUTAGE_ID, hold_ms, others, 0]
        await self._run("import", 0, int(self._pending_lease_s * 1000), *entries)
        for res in self._local_live:  # adopted as leased entries: renewed from now on
            if res.inner is not None and (res.pending or math.isinf(res.inner.expires_at)):
                self._leased.add(res)
                self._pending_units += res.amount if res.pending else 0
        self._local_live -= self._leased
        self._on_local = False
        _log.info("shared rate gate is back on Redis", gate=self.name, url=mask_url(self.url))

    def _go_local(self, exc: BaseException) -> None:
        if self._on_local:
            return
        self._on_local = True
        _log.warning(
            "Redis unreachable: rate gate falls back to a local share of the budget",
            gate=self.name,
            url=mask_url(self.url),
            error=str(exc),
            local_capacity=self.capacity // self.replicas,
            replicas=self.replicas,
        )
        self._ensure_worker()  # probes Redis until it is back

    # -- wake-ups -----------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Wake the local waiter whose ticket a message names; runs while tickets wait."""
        unavailable = unavailable_errors()
        while self._tickets and not self._closing:
            pubsub = self._redis().pubsub()
            try:
                await pubsub.subscribe(self._channel)
                for event in self._tickets.values():  # messages before subscribing were missed
                    event.set()
                while self._tickets and not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        woken = self._tickets.get(int(message["data"]))
                        if woken is not None:
                            woken.set()
            except unavailable:
                await asyncio.sleep(0.1)  # waiters poll meanwhile
            finally:
                with contextlib.suppress(*unavailable):
                    await pubsub.aclose()

    # -- closing ------------------------------------------------------------------------

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Apply queued operations (up to ``timeout_s`` if Redis is down), then disconnect."""
        if self._closed:
            return
        self._closing = True
        deadline = time.monotonic() + timeout_s
        late: set[asyncio.Task[Any]] = set()
        if self._listener is not None:  # wake-ups only: nothing to drain
            self._listener.cancel()
            late.add(self._listener)
        if self._tasks:  # script calls of cancelled waiters: their clean-up is queued on landing
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            late |= pending
        if self._ops or self._worker is not None:
            self._ensure_worker()
            self._wake.set()
            if self._worker is not None:
                remaining = max(deadline - time.monotonic(), 0.0)
                _, pending = await asyncio.wait([self._worker], timeout=remaining)
                late |= pending
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if self._worker is not None and self._worker.done() and not self._worker.cancelled():
            self._worker.exception()  # retrieved: errors were logged where they happened
        if self._ops:
            _log.warning(
                "shared gate closed with operations not applied",
                gate=self.name,
                dropped=len(self._ops),
            )
            self._ops.clear()
        self._closed = True
        if self._client is not None:
            await self._client.aclose()
            self._client = None

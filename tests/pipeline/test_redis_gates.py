"""The shared (Redis) rate gate, and one gate contract run on both backends.

The contract tests run the in-process gate and the Redis gate through the same scenarios. The
Redis gate keeps time with Redis ``TIME``, so windows here are real and short (0.3-0.8 s) and
assertions are on counts (granted, queued, used), never on durations. Every test uses its own
budget key and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from llmtrail.pipeline import (
    ConfigurationError,
    LLMTrailError,
    LoopClock,
    ServiceClosedError,
    SlidingWindowGate,
)
from llmtrail.pipeline._gates import GateRequestTooLarge
from llmtrail.pipeline._redis_gates import (
    RateLimitBackendUnavailable,
    RedisSlidingWindowGate,
    create_gate,
    mask_url,
)

Gate = SlidingWindowGate | RedisSlidingWindowGate


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` (bounded): for states reached through Redis round trips."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s}s")
        await asyncio.sleep(0.005)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SharedState:
    """Reads a gate's keys straight from Redis (sync client), to see what other processes see."""

    def __init__(self, url: str, name: str, key: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.base = f"llmtrail:gate:{name}:{{{key}}}"

    def used(self) -> int:
        return int(self.client.hget(f"{self.base}:state", "used") or 0)

    def queued(self) -> int:
        return int(self.client.zcard(f"{self.base}:queue"))

    def pending(self) -> int:
        return int(self.client.zcard(f"{self.base}:pending"))

    def sent(self) -> int:
        return int(self.client.zcard(f"{self.base}:sent"))

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.client.scan_iter(match=f"{self.base}:*"))

    def delete(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.base}:*"))
        if keys:
            self.client.delete(*keys)
        self.client.close()


class Backend:
    """Makes gates of one backend; ``peer`` is another process's view of the same budget."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.key = f"test:{uuid.uuid4().hex}"
        self.gates: list[Gate] = []
        self.state = SharedState(url, "rpm", self.key) if url else None
        self._args: dict[str, Any] = {}

    def gate(
        self, capacity: int, window_s: float = 0.5, guard_s: float | None = 0.0, **kw: Any
    ) -> Gate:
        self._args = {"capacity": capacity, "window_s": window_s, "guard_s": guard_s, **kw}
        if self.kind == "memory":
            made: Gate = SlidingWindowGate(
                "rpm", capacity, window_s, clock=LoopClock(), send_guard_s=guard_s
            )
        else:
            assert self.url is not None
            made = RedisSlidingWindowGate(
                "rpm",
                capacity,
                window_s,
                url=self.url,
                key=self.key,
                clock=LoopClock(),
                send_guard_s=guard_s,
                **kw,
            )
        self.gates.append(made)
        return made

    def peer(self, gate: Gate) -> Gate:
        """The in-process gate is one object per process; Redis gates share through the key."""
        if self.kind == "memory":
            return gate
        args = dict(self._args)
        return self.gate(args.pop("capacity"), args.pop("window_s"), args.pop("guard_s"), **args)

    async def applied(self) -> None:
        for gate in self.gates:
            if isinstance(gate, RedisSlidingWindowGate):
                await gate.flush()

    def queued(self, gate: Gate) -> int:
        return self.state.queued() if self.state is not None else gate.waiting()

    def used(self, gate: Gate) -> int:
        return self.state.used() if self.state is not None else gate.used()

    async def close(self) -> None:
        for gate in self.gates:
            if isinstance(gate, RedisSlidingWindowGate):
                await gate.aclose()
        if self.state is not None:
            self.state.delete()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = Backend(request.param, url)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[Backend]:
    made = Backend("redis", redis_url)
    try:
        yield made
    finally:
        await made.close()


async def finish(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- one contract, both backends --------------------------------------------------------------


async def test_check_and_reserve_is_atomic_under_concurrent_callers(backend: Backend) -> None:
    first = backend.gate(capacity=5)
    clients = [first, backend.peer(first), backend.peer(first)]
    tasks = [asyncio.create_task(clients[i % 3].acquire(1)) for i in range(30)]
    await wait_until(lambda: sum(t.done() for t in tasks) == 5 and backend.queued(first) == 25)
    await asyncio.sleep(0.2)  # pending units never expire: nobody else may get in meanwhile
    assert sum(t.done() for t in tasks) == 5
    assert backend.used(first) == 5
    granted = next(t for t in tasks if t.done())
    clients[0].release(granted.result())  # released through another client than it came from
    await wait_until(lambda: sum(t.done() for t in tasks) == 6)
    await asyncio.sleep(0.1)
    assert sum(t.done() for t in tasks) == 6
    await finish(tasks)


async def test_waiters_are_served_in_arrival_order_across_clients(backend: Backend) -> None:
    first = backend.gate(capacity=1)
    second = backend.peer(first)
    held = await first.acquire(1)
    order: list[int] = []

    async def waiter(i: int, gate: Gate) -> None:
        res = await gate.acquire(1)
        order.append(i)
        gate.release(res)  # hands the unit to the next in line

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(waiter(i, first if i % 2 else second)))
        await wait_until(lambda n=i + 1: backend.queued(first) == n)
    first.release(held)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_later_small_request_never_overtakes_the_head(backend: Backend) -> None:
    gate = backend.gate(capacity=2)
    peer = backend.peer(gate)
    held = await gate.acquire(1)
    big = asyncio.create_task(gate.acquire(2))
    await wait_until(lambda: backend.queued(gate) == 1)
    small = asyncio.create_task(peer.acquire(1))  # it would fit, but it came second
    await wait_until(lambda: backend.queued(gate) == 2)
    await asyncio.sleep(0.1)
    assert not small.done() and not big.done()
    gate.release(held)
    await asyncio.wait_for(big, 10)
    assert not small.done()
    gate.release(big.result())
    assert (await asyncio.wait_for(small, 10)).waiters_ahead == 1


@pytest.mark.slow
async def test_pending_never_expires_and_the_window_starts_at_send(backend: Backend) -> None:
    gate = backend.gate(capacity=1, window_s=0.8)
    res = await gate.acquire(1)
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    await asyncio.sleep(1.0)  # longer than the window: a pending unit still counts
    assert not waiter.done()
    gate.mark_sent(res)  # its window starts now, not at the reservation 1 s ago
    await backend.applied()
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert backend.queued(gate) == 1
    await asyncio.wait_for(waiter, 10)  # and ends one window later
    assert backend.used(gate) == 1


@pytest.mark.slow
async def test_an_attempt_in_flight_holds_its_unit_until_it_is_done(backend: Backend) -> None:
    if backend.kind == "memory" and not hasattr(SlidingWindowGate, "mark_done"):
        pytest.skip("the in-process gate has no mark_done in this revision")
    gate = backend.gate(capacity=1, window_s=0.6, guard_s=None)
    res = await gate.acquire(1)
    gate.mark_sent(res)  # no guard: no window end while the attempt is in flight
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    await asyncio.sleep(0.8)
    assert not waiter.done()
    gate.mark_done(res)  # answered now: the window ends one window from now
    await backend.applied()
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await asyncio.wait_for(waiter, 10)


async def test_a_body_sent_bound_ends_the_window_before_the_answer(backend: Backend) -> None:
    gate = backend.gate(capacity=1, window_s=0.6, guard_s=None)
    res = await gate.acquire(1)
    gate.mark_sent(res)
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    await asyncio.sleep(0.8)
    assert not waiter.done()  # in flight with no bound on its arrival: it still counts
    # The body was written 0.7 s ago and arrived within a 0.05 s guard: the window has ended,
    # though no answer came.
    gate.mark_arrived(res, asyncio.get_running_loop().time() - 0.65)
    await asyncio.wait_for(waiter, 10)


async def test_a_provider_with_more_room_frees_units_that_arrived(backend: Backend) -> None:
    gate = backend.gate(capacity=4, window_s=5.0, guard_s=None)
    now = asyncio.get_running_loop().time()
    for _ in range(4):
        res = await gate.acquire(1)
        gate.mark_sent(res)
        gate.mark_arrived(res, now)
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    # 48 per minute is 4 per 5 s window; 2 remain: the provider counts 2 of our 4 units.
    gate.observe_provider(2, 5.0, as_of=now + 0.01, limit=48)
    await asyncio.wait_for(waiter, 10)
    await backend.applied()
    assert backend.used(gate) == 3


async def test_release_returns_units_and_wakes_the_head(backend: Backend) -> None:
    gate = backend.gate(capacity=2)
    a = await gate.acquire(2)
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    assert not waiter.done()
    gate.release(a)
    await asyncio.wait_for(waiter, 10)
    await backend.applied()
    assert backend.used(gate) == 1
    assert a.done


async def test_reconcile_replaces_the_estimate_with_the_real_count(backend: Backend) -> None:
    gate = backend.gate(capacity=1000, window_s=30.0)
    res = await gate.acquire(600)
    gate.mark_sent(res)
    waiter = asyncio.create_task(backend.peer(gate).acquire(500))
    await wait_until(lambda: backend.queued(gate) == 1)
    assert not waiter.done()
    gate.reconcile(res, 450)
    await asyncio.wait_for(waiter, 10)
    await backend.applied()
    assert backend.used(gate) == 950
    gate.reconcile(res, 700)  # upwards too: the gate believes reality
    await backend.applied()
    assert backend.used(gate) == 1200


async def test_cancelled_waiters_leave_nothing_behind(backend: Backend) -> None:
    gate = backend.gate(capacity=2)
    peer = backend.peer(gate)
    held = [await gate.acquire(1), await gate.acquire(1)]
    doomed = [asyncio.create_task((gate, peer)[i % 2].acquire(1)) for i in range(12)]
    for i, task in enumerate(doomed):  # cancelled before, during and after their script call
        for _ in range(i):
            await asyncio.sleep(0)
        if i >= 8:
            await asyncio.sleep(0.02 * (i - 7))
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    assert all(t.cancelled() for t in doomed)
    for res in held:
        gate.release(res)
    await backend.applied()
    assert backend.used(gate) == 0
    assert backend.queued(gate) == 0
    assert gate.waiting() == 0 and peer.waiting() == 0
    assert gate.reserved() == 0
    whole = await asyncio.wait_for(peer.acquire(2), 10)  # the whole window is free again
    assert whole.waiters_ahead == 0


async def test_a_grant_racing_with_cancellation_is_given_back(backend: Backend) -> None:
    gate = backend.gate(capacity=1)
    for spins in range(0, 12, 2):  # the grant lands at a different point each time
        held = await gate.acquire(1)
        waiter = asyncio.create_task(backend.peer(gate).acquire(1))
        await wait_until(lambda: backend.queued(gate) == 1)
        gate.release(held)
        for _ in range(spins):
            await asyncio.sleep(0)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            res = await waiter
            gate.release(res)  # the grant won the race: its owner gives it back
        await backend.applied()
        assert backend.used(gate) == 0, f"a unit leaked after {spins} spins"
        assert backend.queued(gate) == 0


async def test_gate_believes_the_provider_when_it_reports_less_room(backend: Backend) -> None:
    gate = backend.gate(capacity=10)
    gate.observe_provider(remaining=0, reset_s=0.3)
    await backend.applied()
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    assert not waiter.done()
    await asyncio.wait_for(waiter, 10)  # admitted once the provider's reset has passed


async def test_a_report_of_more_room_without_its_send_time_is_ignored(backend: Backend) -> None:
    gate = backend.gate(capacity=2)
    gate.observe_provider(remaining=100, reset_s=1.0)
    await backend.applied()
    await gate.acquire(2)
    waiter = asyncio.create_task(backend.peer(gate).acquire(1))
    await wait_until(lambda: backend.queued(gate) == 1)
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await finish([waiter])


async def test_a_request_larger_than_the_window_fails_fast_with_a_fix(backend: Backend) -> None:
    gate = backend.gate(capacity=100)
    with pytest.raises(GateRequestTooLarge, match="never be admitted"):
        await gate.acquire(101)


# -- Redis only -------------------------------------------------------------------------------


async def test_two_gate_objects_share_one_budget(shared: Backend) -> None:
    a = shared.gate(capacity=4, window_s=0.3)
    b = shared.peer(a)
    taken = [await a.acquire(1) for _ in range(3)] + [await b.acquire(1)]
    for res in taken:
        (a if res in taken[:3] else b).mark_sent(res)
    waiter = asyncio.create_task(b.acquire(1))
    await wait_until(lambda: shared.queued(a) == 1)
    assert not waiter.done()
    await shared.applied()
    assert shared.state is not None and shared.state.sent() == 4
    await asyncio.wait_for(waiter, 10)  # once the sends age out of the window


async def test_keys_are_namespaced_by_gate_and_budget_key(shared: Backend) -> None:
    gate = shared.gate(capacity=3, window_s=0.3)
    res = await gate.acquire(1)
    gate.mark_sent(res)
    await shared.applied()
    assert shared.state is not None
    prefix = f"llmtrail:gate:rpm:{{{shared.key}}}:"
    assert shared.state.keys() == [prefix + p for p in ("amounts", "sent", "state")]


@pytest.mark.slow
async def test_a_live_holder_keeps_pending_units_past_the_lease(shared: Backend) -> None:
    gate = shared.gate(capacity=1, window_s=0.3, pending_lease_s=0.3, queue_lease_s=0.3)
    res = await gate.acquire(1)
    waiter = asyncio.create_task(shared.peer(gate).acquire(1))
    await asyncio.sleep(1.0)  # three leases: renewed by the holder's heartbeat
    assert not waiter.done()
    assert shared.state is not None and shared.state.pending() == 1
    gate.release(res)
    await asyncio.wait_for(waiter, 10)


@pytest.mark.slow
async def test_a_dead_process_holds_units_and_its_place_for_one_lease_only(
    shared: Backend,
) -> None:
    assert shared.url is not None and shared.state is not None
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from llmtrail.pipeline import LoopClock
        from llmtrail.pipeline._redis_gates import RedisSlidingWindowGate

        async def main():
            gate = RedisSlidingWindowGate(
                "rpm", 1, 0.3, url={shared.url!r}, key={shared.key!r}, clock=LoopClock(),
                pending_lease_s=0.6, queue_lease_s=0.6)
            await gate.acquire(1)
            asyncio.create_task(gate.acquire(1))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if gate._tickets:
                    break
            print("holding", flush=True)
            os._exit(0)  # dies without cleaning up

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "holding" in out.stdout
    assert shared.state.pending() == 1 and shared.state.queued() == 1
    gate = shared.gate(capacity=1, window_s=0.3)
    res = await asyncio.wait_for(gate.acquire(1), 10)
    assert res.waiters_ahead == 1  # the dead waiter was ahead, and was skipped
    assert shared.state.pending() == 1 and shared.state.queued() == 0


async def test_a_provider_with_less_room_holds_back_only_the_difference(
    shared: Backend,
) -> None:
    gate = shared.gate(capacity=4, window_s=30.0)
    for _ in range(2):
        gate.mark_sent(await gate.acquire(1))
    gate.observe_provider(remaining=1, reset_s=30.0)  # we think 2 are free; it says 1
    await shared.applied()
    await asyncio.wait_for(gate.acquire(1), 10)
    waiter = asyncio.create_task(shared.peer(gate).acquire(1))
    await wait_until(lambda: shared.queued(gate) == 1)
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await finish([waiter])


async def test_preload_fills_only_an_empty_shared_window(shared: Backend) -> None:
    a = shared.gate(capacity=5, window_s=5.0)
    assert a.preload([(0.1, 1), (1.0, 1), (60.0, 1)]) == 2
    await shared.applied()
    assert shared.state is not None and shared.state.used() == 2
    b = shared.peer(a)
    b.preload([(0.1, 1), (1.0, 1)])  # another replica warming from the same store
    await shared.applied()
    assert shared.state.used() == 2


async def test_a_send_after_a_lapsed_lease_is_still_counted(shared: Backend) -> None:
    assert shared.state is not None
    gate = shared.gate(capacity=2, window_s=5.0, pending_lease_s=0.3)
    res = await gate.acquire(1)
    gate._unlease(res)  # no longer renewed: as if the process had stalled past its lease
    await asyncio.sleep(0.5)
    await shared.peer(gate).acquire(1)  # its script purges the lapsed entry
    assert shared.state.pending() == 1
    gate.mark_sent(res)
    await shared.applied()
    assert shared.state.sent() == 1 and shared.state.used() == 2


async def test_aclose_applies_what_was_queued_and_then_refuses_calls(shared: Backend) -> None:
    assert shared.state is not None
    gate = shared.gate(capacity=3, window_s=30.0)
    kept, given_back = await gate.acquire(1), await gate.acquire(1)
    gate.mark_sent(kept)
    gate.mark_done(kept)
    gate.release(given_back)
    await gate.aclose()  # no flush first: closing applies the queue
    assert shared.state.used() == 1 and shared.state.sent() == 1 and shared.state.pending() == 0
    with pytest.raises(ServiceClosedError, match="closed"):
        await gate.acquire(1)


# -- unreachable Redis ------------------------------------------------------------------------


async def test_unreachable_redis_fails_closed_naming_the_url_and_the_fix() -> None:
    url = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
    gate = create_gate(
        "rpm", 10, 1.0, clock=LoopClock(), send_guard_s=0.0, rate_limit_url=url, key="k"
    )
    try:
        with pytest.raises(RateLimitBackendUnavailable) as info:
            await gate.acquire(1)
        message = str(info.value)
        assert "127.0.0.1" in message and ":***@" in message and "s3cret" not in message
        assert "rate_limit_fallback='local'" in message
        assert isinstance(info.value, LLMTrailError)
        assert isinstance(gate, RedisSlidingWindowGate)
        with pytest.raises(RateLimitBackendUnavailable):
            await gate.start()
    finally:
        await gate.aclose()


async def test_local_fallback_holds_a_share_of_the_budget_and_warns_once() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    gate = create_gate(
        "rpm",
        6,
        0.5,
        clock=LoopClock(),
        send_guard_s=0.0,
        rate_limit_url=url,
        key="k",
        fallback="local",
        replicas=3,
    )
    assert isinstance(gate, RedisSlidingWindowGate)
    try:
        with capture_logs() as logs:
            granted = [await gate.acquire(1), await gate.acquire(1)]
            waiter = asyncio.create_task(gate.acquire(1))
            await asyncio.sleep(0.05)
        assert not waiter.done()  # 6 // 3 = 2 per window on this replica
        assert gate.on_local_fallback
        assert gate.used() == 2 and gate.reserved() == 2
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1
        assert warnings[0]["local_capacity"] == 2 and warnings[0]["gate"] == "rpm"
        gate.release(granted[0])
        await asyncio.wait_for(waiter, 10)
    finally:
        await gate.aclose()


async def test_start_finds_redis_unreachable_and_takes_the_local_share() -> None:
    gate = RedisSlidingWindowGate(
        "tpm",
        1000,
        1.0,
        url=f"redis://127.0.0.1:{closed_port()}/0",
        key="k",
        clock=LoopClock(),
        fallback="local",
        replicas=4,
    )
    try:
        with capture_logs() as logs:
            await gate.start()
            await gate.acquire(250)
        assert gate.on_local_fallback
        assert [e["local_capacity"] for e in logs if e["log_level"] == "warning"] == [250]
        waiter = asyncio.create_task(gate.acquire(1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await finish([waiter])
    finally:
        await gate.aclose()


class Proxy:
    """A TCP relay to Redis that can be cut and restored: an outage on 127.0.0.1."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()  # the client sees the connection closed: Redis is "down"
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.close()
        await wait_until(lambda: not self._writers)  # the relays end on their own
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.slow
async def test_local_fallback_returns_to_redis_and_carries_its_units_over(
    redis_url: str,
) -> None:
    proxy = Proxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    key = f"test:{uuid.uuid4().hex}"
    state = SharedState(redis_url, "rpm", key)
    gate = RedisSlidingWindowGate(
        "rpm",
        6,
        30.0,
        send_guard_s=None,
        url=f"redis://127.0.0.1:{proxy.port}/0",
        key=key,
        clock=LoopClock(),
        fallback="local",
        replicas=2,
        probe_s=0.05,
    )
    try:
        with capture_logs() as logs:
            answered = await gate.acquire(1)
            gate.mark_sent(answered)
            gate.mark_done(answered)  # its window end is known: now + window
            in_flight = await gate.acquire(1)
            gate.mark_sent(in_flight)  # no guard: no window end until it is done
            pending = await gate.acquire(1)
            assert gate.on_local_fallback
            proxy.up = True
            await wait_until(lambda: not gate.on_local_fallback)
        assert [e["log_level"] for e in logs if e["log_level"] != "debug"] == ["warning", "info"]
        # Our three units, plus a placeholder for the other replica's local share (6 // 2).
        assert state.used() == 3 + 3
        assert state.sent() == 2 and state.pending() == 2  # in flight and pending: leased
        waiter = asyncio.create_task(gate.acquire(1))  # on Redis again, and the budget is full
        await wait_until(lambda: state.queued() == 1)
        assert not waiter.done()
        gate.release(pending)
        assert (await asyncio.wait_for(waiter, 10)).inner is None
        gate.mark_done(in_flight)
        await gate.flush()
        assert state.used() == 6 and state.sent() == 3 and state.pending() == 1
    finally:
        await gate.aclose()
        await proxy.close()
        state.delete()


# -- the factory ------------------------------------------------------------------------------


def test_create_gate_without_a_url_is_the_in_process_gate() -> None:
    gate = create_gate(
        "tpm", 100, 1.0, clock=LoopClock(), send_guard_s=0.0, rate_limit_url=None, key="k"
    )
    assert type(gate) is SlidingWindowGate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fallback": "open"}, "rate_limit_fallback='open' is invalid"),
        ({"rate_limit_url": "http://127.0.0.1:6379"}, "not a Redis URL"),
        ({"fallback": "local", "replicas": 11}, "too little to split across 11 replicas"),
        ({"replicas": 0}, "rate_limit_replicas=0 is invalid"),
    ],
)
def test_invalid_settings_name_the_fix(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"rate_limit_url": "redis://127.0.0.1:6379/0", "key": "k"} | kwargs
    with pytest.raises(ConfigurationError, match=match):
        create_gate("rpm", 10, 1.0, clock=LoopClock(), send_guard_s=0.0, **args)


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert "pw" not in mask_url("rediss://:pw@[::1]:6379")

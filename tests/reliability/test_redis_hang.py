"""A Redis that accepts connections and never answers cannot hold callers for long.

The "server" is a TCP listener on 127.0.0.1 that reads and never writes. Far more callers than
the gate's connection pool holds ask for a slot at once: every one of them must be refused
(``fail_closed``) or served by the local share (``local``) within a bound set by the gate's
timeouts, not queue behind the pool for a multiple of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmtrail.pipeline._clock import LoopClock
from llmtrail.pipeline._redis_gates import RateLimitBackendUnavailable, RedisSlidingWindowGate

pytestmark = pytest.mark.timeout(60)

COMMAND_TIMEOUT_S = 0.5
CALLERS = 320  # ten times the gate's pool of 32 connections


@pytest.fixture
async def hung_redis() -> AsyncIterator[str]:
    clients: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)
        try:
            while await reader.read(65536):
                pass  # never answer
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for client in clients:
            client.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def acquire_all(gate: RedisSlidingWindowGate) -> tuple[list[object], float]:
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one() -> object:
        try:
            return await gate.acquire(1)
        except RateLimitBackendUnavailable as exc:
            return exc
        finally:
            finished.append(loop.time() - started)

    finished: list[float] = []
    results = await asyncio.gather(*(one() for _ in range(CALLERS)))
    return list(results), max(finished)


@pytest.mark.parametrize("fallback", ["fail_closed", "local"])
async def test_a_hung_redis_answers_every_caller_within_the_gate_timeouts(
    hung_redis: str, fallback: str
) -> None:
    gate = RedisSlidingWindowGate(
        "rpm",
        10_000,
        60.0,
        url=hung_redis,
        key="hang",
        clock=LoopClock(),
        fallback=fallback,  # type: ignore[arg-type]
        connect_timeout_s=COMMAND_TIMEOUT_S,
        command_timeout_s=COMMAND_TIMEOUT_S,
    )
    try:
        results, slowest = await acquire_all(gate)
    finally:
        await gate.aclose(timeout_s=2.0)
    if fallback == "fail_closed":
        assert all(isinstance(r, RateLimitBackendUnavailable) for r in results)
    else:
        assert not any(isinstance(r, BaseException) for r in results)
        assert gate.on_local_fallback
    # Waiting for a pooled connection, then for the script: two timeouts at most (with slack
    # for a loaded machine). Unbounded pool waits took ten rounds of the timeout here.
    assert slowest < 4 * COMMAND_TIMEOUT_S + 1.0, f"a caller waited {slowest:.1f}s"

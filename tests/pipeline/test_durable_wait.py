"""The write-ahead wait of one call (``CallStream.durable``): bounded by ``store_timeout_s``,
and never confusing the caller's cancellation with the store's answer.

The store here is a :class:`~llmtrail.testing.RecordingSink` made a ``DurableSink`` whose
futures the test resolves, fails or cancels itself, so each outcome happens exactly when the
test says.
The real writer and real outages are in tests/reliability (store outage, kill, close).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT

from llmtrail.pipeline import ProviderError
from llmtrail.pipeline._call import CallStream
from llmtrail.pipeline._errors import ErrorType
from llmtrail.storage import StoreError
from llmtrail.testing import RecordingSink

TIMEOUT_S = 0.2


class _Store(RecordingSink):
    """Hands out a new future per ``durable()``, as the protocol asks, and keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.futures: list[asyncio.Future[None]] = []

    def durable(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


def _call(store: _Store) -> CallStream:
    return CallStream([store], "test:1", INVALID_SPAN_CONTEXT, set(), store, TIMEOUT_S)


async def test_a_commit_in_time_returns_none() -> None:
    store = _Store()
    call = _call(store)
    waiting = asyncio.ensure_future(call.durable())
    await asyncio.sleep(0)
    store.futures[0].set_result(None)
    assert await waiting is None


async def test_no_commit_within_the_timeout_says_so_and_gives_up_only_its_own_future() -> None:
    store = _Store()
    started = time.monotonic()
    problem = await _call(store).durable()
    assert problem is not None and "store_timeout_s=0.2" in problem
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 1.0
    assert store.futures[0].cancelled()


async def test_a_commit_that_lands_as_the_time_runs_out_counts_as_committed() -> None:
    store = _Store()
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(_call(store).durable())
    await asyncio.sleep(0)
    # The commit is due just before the deadline, and the loop is busy past both: they fire
    # in the same turn, the commit first.
    loop.call_later(TIMEOUT_S - 0.01, store.futures[0].set_result, None)
    loop.call_later(TIMEOUT_S - 0.05, time.sleep, 0.1)
    assert await waiting is None


async def test_the_caller_s_cancellation_goes_through() -> None:
    store = _Store()
    call = _call(store)
    waiting = asyncio.ensure_future(call.sent_durable(1))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_future_its_store_cancelled_is_a_stopped_store_not_a_cancelled_call() -> None:
    store = _Store()
    waiting = asyncio.ensure_future(_call(store).durable())
    await asyncio.sleep(0)
    store.futures[0].cancel()
    problem = await waiting
    assert problem is not None and problem.startswith("the event store stopped")


async def test_a_store_error_is_reported_and_the_attempt_is_not_sent() -> None:
    store = _Store()
    call = _call(store)
    waiting = asyncio.ensure_future(call.durable())
    await asyncio.sleep(0)
    store.futures[0].set_exception(StoreError("disk image is malformed"))
    problem = await waiting
    assert problem is not None and "disk image is malformed" in problem

    store.futures.clear()
    sending = asyncio.ensure_future(call.sent_durable(1))
    await asyncio.sleep(0)
    store.futures[0].set_exception(StoreError("disk image is malformed"))
    with pytest.raises(ProviderError) as raised:
        await sending
    assert raised.value.error_type is ErrorType.STORE_UNAVAILABLE

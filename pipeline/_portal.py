"""Awaiting, from one event loop, a coroutine that runs on another loop's thread.

Used by ``BaseLLMService(own_loop=True)``: the calls run on the service's private loop thread,
and the application's loop only waits for their results, so the CPU the calls cost (the SDK's
parsing, the gates, the sinks) never delays the application's other callbacks by more than
a GIL switch interval.

Invariants:
- The coroutine runs as a task on ``loop`` in a copy of the caller's context (contextvars:
  structlog's bound ids, OpenTelemetry's current span), created on that loop's thread.
- Its result or exception is delivered to the caller's loop; a result that arrives after the
  caller stopped waiting is dropped (the task has already recorded it in its events).
- Cancelling the caller cancels the task and then waits for it to end before the
  ``CancelledError`` propagates, so everything the task does on cancellation (``completed``
  with outcome ``cancelled``, permits given back) has happened when the caller sees it.
  Further cancellations during that wait are absorbed: one ``CancelledError`` is raised.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["call_on_loop"]

T = TypeVar("T")


def _deliver(task: asyncio.Task[T], result: asyncio.Future[T]) -> None:
    """Copy ``task``'s outcome into ``result`` (runs on the caller's loop)."""
    if result.done():
        return
    if task.cancelled():
        result.cancel()
    elif (exc := task.exception()) is not None:
        result.set_exception(exc)
    else:
        result.set_result(task.result())


async def call_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (running in another thread) and await its result here."""
    caller = asyncio.get_running_loop()
    result: asyncio.Future[T] = caller.create_future()
    context = contextvars.copy_context()
    task_box: list[asyncio.Task[T]] = []

    def begin() -> None:
        task = loop.create_task(coro, context=context)
        task_box.append(task)
        task.add_done_callback(lambda t: caller.call_soon_threadsafe(_deliver, t, result))

    loop.call_soon_threadsafe(begin)
    try:
        return await asyncio.shield(result)
    except asyncio.CancelledError:
        # begin() ran before this (same loop, scheduled earlier), so the task exists.
        loop.call_soon_threadsafe(lambda: task_box[0].cancel())
        while not result.done():
            try:
                await asyncio.shield(result)
            except asyncio.CancelledError:
                continue  # the task's own end, or one more cancellation of ours
            except BaseException:
                break  # the task ended otherwise; the caller is cancelled all the same
        raise

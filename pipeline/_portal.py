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
- Hand-offs in either direction go through an :class:`_Inbox` per loop: a burst of submissions
  (10,000 calls gathered at once) or of completions wakes the other loop once, not once per
  call; callbacks run in the order they were handed over.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["call_on_loop"]

T = TypeVar("T")


class _Inbox:
    """Callbacks handed to ``loop`` from other threads, run in order, one wake-up per burst."""

    __slots__ = ("_loop", "_lock", "_pending", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False

    def put(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(callback)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for callback in pending:
            try:
                callback()
            except Exception as exc:  # one bad callback must not strand the others
                self._loop.call_exception_handler(
                    {"message": "llmtrail loop hand-off failed", "exception": exc}
                )


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.get(loop)
            if inbox is None:
                inbox = _inboxes[loop] = _Inbox(loop)
    return inbox


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
    back = _inbox(caller)
    there = _inbox(loop)
    result: asyncio.Future[T] = caller.create_future()
    context = contextvars.copy_context()
    task_box: list[asyncio.Task[T]] = []

    def finished(task: asyncio.Task[T]) -> None:
        back.put(lambda: _deliver(task, result))

    def begin() -> None:
        task = loop.create_task(coro, context=context)
        task_box.append(task)
        task.add_done_callback(finished)

    there.put(begin)
    try:
        return await asyncio.shield(result)
    except asyncio.CancelledError:
        # begin() runs before this (same inbox, handed over earlier), so the task exists.
        def cancel() -> None:
            task_box[0].cancel()

        there.put(cancel)
        while not result.done():
            try:
                await asyncio.shield(result)
            except asyncio.CancelledError:
                continue  # the task's own end, or one more cancellation of ours
            except BaseException:
                break  # the task ended otherwise; the caller is cancelled all the same
        raise

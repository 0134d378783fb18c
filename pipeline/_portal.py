"""The loop a service lives on, its private loop thread, and awaiting across loops.

:class:`LoopHost` is which event loop owns a service (its gates, semaphore, sinks): the loop
it was started on, or a private loop thread when it is used synchronously (or with
``own_loop=True``). Sync methods run their coroutine on that loop from any thread
(:meth:`LoopHost.run_sync`); calling one from the loop's own thread is refused (it would
deadlock). :meth:`LoopHost.stop` stops and joins the private thread, and closes its loop.

:func:`call_on_loop` awaits, from one event loop, a coroutine that runs on another loop's thread.

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

from ._errors import ServiceClosedError

__all__ = ["LoopHost", "call_on_loop"]

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


class LoopHost:
    """The event loop a service lives on, and the private thread running it, if any."""

    __slots__ = ("owner", "loop", "thread")

    def __init__(self, owner: str) -> None:
        self.owner = owner  # the service's class name, for error messages
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def ensure(self, started: bool) -> asyncio.AbstractEventLoop:
        """The service's loop; a new private loop thread if it has none yet (``started``:
        the service was started on a loop, which must then still run)."""
        loop = self.loop
        if loop is not None and not loop.is_closed() and (loop.is_running() or self.thread):
            return loop
        if started:
            raise ServiceClosedError(
                f"the event loop {self.owner} was started on has stopped; create the "
                "service inside the loop you call it from, or use it only synchronously"
            )
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self.thread = threading.Thread(target=run, name="llmtrail-loop", daemon=True)
        self.thread.start()
        ready.wait()
        self.loop = loop
        return loop

    def run_sync(self, coro: Coroutine[Any, Any, T], started: bool) -> T:
        """Run ``coro`` on the service's loop and block this thread until it is done."""
        loop = self.ensure(started)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError(
                "a sync method of the service was called from its own event loop thread, which "
                "would deadlock; use `await service.execute_generation_async(...)` there"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop and join the private loop thread, if there is one, and close its loop."""
        loop = self.loop
        if self.thread is not None and loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join()
            loop.close()
            self.thread = None

"""Clocks: the time line of gates, semaphore and retry waits.

- :class:`LoopClock` (the default) reads the running event loop's monotonic time and schedules
  with ``loop.call_at``, so under :class:`VirtualTimeLoop` the very same gate code runs on
  virtual time: that is how replay re-runs production logic without sleeping.
- :class:`ManualClock` is advanced by hand, for unit tests of timer logic.
- :class:`VirtualTimeLoop` is an asyncio event loop whose clock jumps to the next timer instead
  of waiting for it. It must never wait for real I/O: it is for simulations only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import selectors
from collections.abc import Callable
from typing import Any

from .typing import TimerHandle

__all__ = ["LoopClock", "ManualClock", "VirtualTimeLoop", "run_virtual"]


class LoopClock:
    """Time of the running event loop (monotonic seconds)."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)


class _ManualTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when :meth:`advance` is called; timers fire in time order."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer, Callable[[], None]]] = []
        self._counter = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        handle = _ManualTimer()
        heapq.heappush(self._timers, (when, next(self._counter), handle, callback))
        return handle

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.call_at(self._now + max(delay, 0.0), wake)
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due, in order."""
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, handle, callback = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not handle.cancelled:
                callback()
        self._now = target

    def pending_timers(self) -> int:
        return sum(1 for _, _, handle, _ in self._timers if not handle.cancelled)


class _VirtualSelector(selectors.DefaultSelector):
    """Instead of blocking for ``timeout`` seconds, advance the loop's virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # Only the loop's own wake-up pipe registered (a pure simulation): skip the epoll
        # system call, which was about a tenth of a replay's time.
        ready = super().select(0) if len(self.get_map()) > 1 else []
        if ready or self.loop is None:
            return ready
        if timeout is None:
            # Nothing is scheduled and nothing is ready: on virtual time that is a deadlock,
            # and waiting for real would hang forever.
            raise RuntimeError(
                "VirtualTimeLoop has nothing scheduled and nothing ready: a coroutine is waiting "
                "for something that will never happen (virtual-time loops cannot wait on I/O)"
            )
        if timeout > 0:
            self.loop.advance_virtual(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: timers fire in order, instantly, in real terms."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._virtual_now = start

    def time(self) -> float:
        return self._virtual_now

    def advance_virtual(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(coro: Any, *, start: float = 0.0) -> Any:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop` and return its result."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

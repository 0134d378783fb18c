"""A FIFO semaphore that counts its holders and waiters.

Invariants:
- ``in_flight() + free == limit`` at every instant outside a method.
- Permits go to waiters strictly in arrival order; a released permit is handed directly to the
  next live waiter, so a newcomer can never overtake the queue.
- A waiter cancelled while queued leaves the queue; one cancelled in the same tick as its grant
  passes the permit on. Either way no permit leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from ._errors import ConfigurationError

__all__ = ["FairSemaphore"]


class FairSemaphore:
    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"max_concurrent_requests={limit!r} is invalid: use an int >= 1"
            )
        self.limit = limit
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> int:
        """Take a permit; returns how many waiters were ahead."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return 0
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ahead = len(self._waiters)
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the permit was already ours: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise
        return ahead

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    def in_flight(self) -> int:
        return self.limit - self._free

    def waiting(self) -> int:
        return sum(1 for future in self._waiters if not future.done())

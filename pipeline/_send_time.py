"""When an attempt's request body was written: httpcore's ``trace`` extension, per attempt.

The provider adds :func:`attach_send_trace` to its httpx2 client as a request event hook. For
a request made after :func:`set_body_sent_callback` (the call flow sets one per attempt), the hook
sets the request's ``trace`` extension, and httpcore calls it with
``http11.send_request_body.complete`` (or ``http2.``) right after the last byte of the body was
handed to the OS. The callback then runs in the attempt's own task.

Invariants:
- The callback fires *after* the bytes were written, never before: whatever the event loop did
  before (a starved loop, a busy pool), the time it reads is no earlier than the write. A late
  reading only moves a window end later, which is the safe direction.
- No callback, no hook: a request made with no callback set, or through a transport that is
  not httpcore's (a custom ``http_client``), leaves the extension alone and the flow falls back
  to the answer. A ``trace`` extension someone else set is kept and called first.
- Public APIs only: an httpx2 event hook and httpcore's documented ``trace`` extension.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import Any

import httpx2

__all__ = ["attach_send_trace", "reset_body_sent_callback", "set_body_sent_callback"]

_BODY_SENT = ".send_request_body.complete"  # after "http11" or "http2"
_callback: ContextVar[Callable[[], None] | None] = ContextVar(
    "llmtrail_body_sent_callback", default=None
)


def set_body_sent_callback(callback: Callable[[], None]) -> Token[Callable[[], None] | None]:
    """From now on in this context, requests call ``callback()`` once their body was written.
    Undo with :func:`reset_body_sent_callback` (in a ``finally``)."""
    return _callback.set(callback)


def reset_body_sent_callback(token: Token[Callable[[], None] | None]) -> None:
    _callback.reset(token)


async def attach_send_trace(request: httpx2.Request) -> None:
    """httpx2 request event hook: report the body write of this request to the attempt."""
    callback = _callback.get()
    if callback is None:
        return
    prior: Callable[[str, dict[str, Any]], Awaitable[None]] | None = request.extensions.get("trace")

    async def trace(name: str, info: dict[str, Any]) -> None:
        if prior is not None:
            await prior(name, info)
        if name.endswith(_BODY_SENT):
            callback()

    request.extensions["trace"] = trace

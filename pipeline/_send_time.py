"""When an attempt's request body was written and its answer's headers were read: httpcore's
``trace`` extension, per attempt.

The provider adds :func:`attach_send_trace` to its httpx2 client as a request event hook. For
a request made after :func:`set_body_sent_callback` (the call flow sets one per attempt), the hook
sets the request's ``trace`` extension, and httpcore calls it with
``http11.send_request_body.complete`` (or ``http2.``) right after the last byte of the body was
handed to the OS, and with ``receive_response_headers.complete`` once the answer's headers were
read (its first bytes: the provider's time on the request ends there). The callbacks run in the
attempt's own task: the body's, then the headers' (when one is given).

Invariants:
- The callback fires *after* the bytes were written, never before: whatever the event loop did
  before (a starved loop, a busy pool), the time it reads is no earlier than the write. A late
  reading only moves a window end later, which is the safe direction.
- No callback, no hook: a request made with no callback set, or through a transport that is
  not httpcore's (a custom ``http_client``), leaves the extension alone and the flow falls back
  to the answer. A ``trace`` extension someone else set is kept and called first.
- The headers are reported only after the body was (a request whose body was never reported
  reports neither), and only when they were read whole (``.failed`` is not reported).
- A hold (a grant made ahead by the gate, see ``SlidingWindowGate.acquire``'s ``lead_s``) is
  awaited at ``send_request_headers.started``: after the connection is ready, before any byte of
  the request is written. Without the hook there is no hold, so the flow grants ahead only
  once the hook has reported a write.
- Public APIs only: an httpx2 event hook and httpcore's documented ``trace`` extension.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import Any

import httpx2

__all__ = ["attach_send_trace", "reset_body_sent_callback", "set_body_sent_callback"]

_BODY_SENT = ".send_request_body.complete"  # after "http11" or "http2"
_HEADERS_START = ".send_request_headers.started"  # before the request's first byte
_ANSWER_HEADERS = ".receive_response_headers.complete"  # the answer's headers were read

Hold = Callable[[], Awaitable[None]]
_Attempt = tuple[Callable[[], None], Hold | None, Callable[[], None] | None]
_attempt: ContextVar[_Attempt | None] = ContextVar("llmtrail_send_time", default=None)


def set_body_sent_callback(
    callback: Callable[[], None],
    hold: Hold | None = None,
    on_headers: Callable[[], None] | None = None,
) -> Token[_Attempt | None]:
    """From now on in this context, requests call ``callback()`` once their body was written and
    ``on_headers()`` (if given) when their answer's headers were read, and first await
    ``hold()`` (if given) right before their first byte is written: a grant made ahead of time
    is kept there. Undo with :func:`reset_body_sent_callback` (in a ``finally``)."""
    return _attempt.set((callback, hold, on_headers))


def reset_body_sent_callback(token: Token[_Attempt | None]) -> None:
    _attempt.reset(token)


async def attach_send_trace(request: httpx2.Request) -> None:
    """httpx2 request event hook: report the body write of this request, and the answer's
    headers, to the attempt."""
    attempt = _attempt.get()
    if attempt is None:
        return
    callback, hold, on_headers = attempt
    prior: Callable[[str, dict[str, Any]], Awaitable[None]] | None = request.extensions.get("trace")

    written = False

    async def trace(name: str, info: dict[str, Any]) -> None:
        nonlocal written
        if prior is not None:
            await prior(name, info)
        if name.endswith(_BODY_SENT):
            if not written:  # once, even should a body be written again
                written = True
                callback()
        elif written and on_headers is not None and name.endswith(_ANSWER_HEADERS):
            on_headers()
        elif hold is not None and name.endswith(_HEADERS_START):
            await hold()

    request.extensions["trace"] = trace

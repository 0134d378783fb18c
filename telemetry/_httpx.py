"""The HTTP span of each attempt: the OpenTelemetry httpx instrumentation on the SDK's client.

Invariants:
- Only the client given is instrumented (``HTTPX2ClientInstrumentor.instrument_client``, the
  instrumentation as shipped), so there is exactly one HTTP span per request, nested under
  whatever span is current (the pipeline's attempt span).
- Its public request hook adds what the instrumentation cannot know: the
  ``http.request.resend_count`` of a retried attempt (``n - 1`` for attempt ``n``, read from
  the ``X-Client-Request-Id`` header the provider sends as ``{call_id}:{n}``; absent on a first
  attempt, as the convention asks), and masks any credential header the user asked the
  instrumentation to capture (e.g. ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST``).
"""

from __future__ import annotations

from typing import Any, cast

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span

from . import _attributes as A
from ._redact import MASK, is_sensitive_key

__all__ = ["attempt_of", "instrument_client"]

_CLIENT_REQUEST_ID = "x-client-request-id"


def attempt_of(headers: Any) -> int | None:
    """The attempt number in an ``X-Client-Request-Id: {call_id}:{n}`` header, else ``None``."""
    value: Any = None
    if hasattr(headers, "get"):
        value = headers.get(_CLIENT_REQUEST_ID)
    elif headers is not None:
        for name, raw in headers:  # httpcore-style (name, value) byte pairs
            if bytes(name).lower() == _CLIENT_REQUEST_ID.encode():
                value = raw
                break
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    _, _, n = value.rpartition(":")
    return int(n) if n.isdigit() else None


def _on_request(span: Span, request: Any) -> None:
    if not span.is_recording():
        return
    attempt = attempt_of(getattr(request, "headers", None))
    if attempt is not None and attempt > 1:
        span.set_attribute(A.HTTP_REQUEST_RESEND_COUNT, attempt - 1)
    if isinstance(span, ReadableSpan) and span.attributes:
        for key in list(span.attributes):
            if key.startswith("http.request.header.") and is_sensitive_key(key):
                span.set_attribute(key, [MASK])


def _sync_request_hook(span: Span, request: Any) -> None:
    _on_request(span, request)


async def _async_request_hook(span: Span, request: Any) -> None:
    _on_request(span, request)


def instrument_client(client: Any, tracer_provider: trace.TracerProvider) -> None:
    """Trace ``client`` (an ``httpx2.AsyncClient`` or ``httpx2.Client``) on ``tracer_provider``."""
    import httpx2
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    if not isinstance(client, httpx2.AsyncClient | httpx2.Client):
        raise TypeError(
            f"instrument_http_client({type(client).__name__}) is unsupported: pass the "
            "httpx2.AsyncClient or httpx2.Client the openai SDK uses"
        )
    hook = _async_request_hook if isinstance(client, httpx2.AsyncClient) else _sync_request_hook
    HTTPX2ClientInstrumentor.instrument_client(
        # Typed for httpx clients; the httpx2 instrumentor takes httpx2 ones at runtime.
        cast(Any, client),
        tracer_provider=tracer_provider,
        # Not our meter provider: the instrumentation's http.client duration histogram
        # costs about as much per request as its span, and the GenAI duration covers it.
        # It goes to the global meter provider (a no-op unless the application set one).
        request_hook=hook,
    )

"""The HTTP span of each attempt: the OpenTelemetry httpx instrumentation on the SDK's client.

Invariants:
- Only the client given is instrumented (``instrument_client``), so there is exactly one HTTP
  span per request, nested under whatever span is current (the pipeline's attempt span).
- A credential header the user asked the instrumentation to capture (e.g. with
  ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST=".*"``) is masked on the span. The
  masking hook is installed only when request headers are captured at all.
- :func:`skip_uncaptured_header_normalisation` changes no span: the instrumentation turns every
  request and response header into a dict (``get_list`` per header, quadratic in their number)
  before learning that no header is to be captured; when none is, the header argument of its
  two attribute helpers is replaced by ``None``, whose normalised form is the same empty
  result. It wraps those helpers once per process, only when their signatures are the ones
  read here, and does nothing otherwise. Importing this module patches nothing.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span

from ._redact import MASK, is_sensitive_key

__all__ = ["instrument_client", "skip_uncaptured_header_normalisation"]

_CAPTURE_REQUEST = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST"
_HELPERS = (
    "_apply_request_client_attributes_to_span",
    "_apply_response_client_attributes_to_span",
)
_patch_lock = threading.Lock()


def _mask_credential_headers(span: Span) -> None:
    if not isinstance(span, ReadableSpan) or not span.attributes:
        return
    for key in list(span.attributes):
        if key.startswith("http.request.header.") and is_sensitive_key(key):
            span.set_attribute(key, [MASK])


def _sync_request_hook(span: Span, request: Any) -> None:
    _mask_credential_headers(span)


async def _async_request_hook(span: Span, request: Any) -> None:
    _mask_credential_headers(span)


def _without_uncaptured_headers(helper: Callable[..., None]) -> Callable[..., None] | None:
    """``helper`` called with ``headers=None`` when ``captured_headers`` is empty, or ``None``
    when its signature is not the one this relies on."""
    params = list(inspect.signature(helper).parameters)
    if "headers" not in params or "captured_headers" not in params:
        return None
    at_headers, at_captured = params.index("headers"), params.index("captured_headers")

    def wrapper(*args: Any, **kwargs: Any) -> None:
        n = len(args)
        captured = args[at_captured] if n > at_captured else kwargs.get("captured_headers")
        if not captured:
            if n > at_headers:
                args = (*args[:at_headers], None, *args[at_headers + 1 :])
            elif "headers" in kwargs:
                kwargs["headers"] = None
        helper(*args, **kwargs)

    wrapper.__wrapped__ = helper  # type: ignore[attr-defined]
    wrapper.__name__ = helper.__name__
    return wrapper


def skip_uncaptured_header_normalisation() -> bool:
    """Wrap the instrumentation's attribute helpers (see the module docstring), once; return
    whether they are wrapped."""
    from opentelemetry.instrumentation import httpx as instrumentation

    with _patch_lock:
        wrapped: list[tuple[str, Callable[..., None]]] = []
        for name in _HELPERS:
            helper = getattr(instrumentation, name, None)
            if helper is None:
                return False
            if hasattr(helper, "__wrapped__"):
                continue  # already done
            wrapper = _without_uncaptured_headers(helper)
            if wrapper is None:
                return False
            wrapped.append((name, wrapper))
        for name, wrapper in wrapped:
            setattr(instrumentation, name, wrapper)
    return True


def instrument_client(client: Any, tracer_provider: trace.TracerProvider) -> None:
    """Trace ``client`` (an ``httpx2.AsyncClient`` or ``httpx2.Client``) on ``tracer_provider``."""
    import httpx2
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor
    from opentelemetry.util.http import get_custom_headers

    if not isinstance(client, httpx2.AsyncClient | httpx2.Client):
        raise TypeError(
            f"instrument_http_client({type(client).__name__}) is unsupported: pass the "
            "httpx2.AsyncClient or httpx2.Client the openai SDK uses"
        )
    skip_uncaptured_header_normalisation()
    hook: Callable[..., Any] | None = None
    if get_custom_headers(_CAPTURE_REQUEST):
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

"""The HTTP span's instrumentation (telemetry._httpx): same attributes, less work per request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from opentelemetry.instrumentation import httpx as instrumentation
from opentelemetry.instrumentation._semconv import _StabilityMode
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrail.telemetry._httpx import (
    _without_uncaptured_headers,
    skip_uncaptured_header_normalisation,
)

HEADERS = httpx2.Headers({"Authorization": "Bearer sk-x", "X-Stainless-Os": "Linux", "A": "1,2"})


def _request_attributes(helper: Callable[..., None], captured: list[str]) -> dict[str, Any]:
    span_attrs: dict[str, Any] = {}
    metric_attrs: dict[str, Any] = {}
    helper(
        span_attrs,
        metric_attrs,
        httpx2.URL("http://127.0.0.1:8000/v1/responses"),
        "POST",
        _StabilityMode.DEFAULT,
        httpx2,
        HEADERS,
        captured,
        [],
    )
    return {"span": span_attrs, "metric": metric_attrs}


def _response_attributes(helper: Callable[..., None], captured: list[str]) -> dict[str, Any]:
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        helper(span, 200, "HTTP/1.1", _StabilityMode.DEFAULT, httpx2, HEADERS, captured, [])
    provider.shutdown()
    (finished,) = exporter.get_finished_spans()
    return dict(finished.attributes or {})


@pytest.mark.parametrize("captured", [[], [".*"], ["x-stainless-os"]])
def test_wrapped_helpers_give_the_originals_attributes(captured: list[str]) -> None:
    assert skip_uncaptured_header_normalisation()
    request = instrumentation._apply_request_client_attributes_to_span
    response = instrumentation._apply_response_client_attributes_to_span
    assert hasattr(request, "__wrapped__") and hasattr(response, "__wrapped__")
    assert _request_attributes(request, captured) == _request_attributes(
        request.__wrapped__, captured
    )
    assert _response_attributes(response, captured) == _response_attributes(
        response.__wrapped__, captured
    )
    if captured:
        assert any(
            k.startswith("http.request.header.")
            for k in _request_attributes(request, captured)["span"]
        )


def test_wrapping_is_done_once() -> None:
    assert skip_uncaptured_header_normalisation()
    first = instrumentation._apply_request_client_attributes_to_span
    assert skip_uncaptured_header_normalisation()
    assert instrumentation._apply_request_client_attributes_to_span is first
    assert not hasattr(first.__wrapped__, "__wrapped__")


def test_a_helper_with_another_signature_is_left_alone() -> None:
    def helper(span_attributes: dict[str, Any], url: str) -> None:
        return None

    assert _without_uncaptured_headers(helper) is None


def test_headers_passed_by_keyword_are_dropped_only_when_none_are_captured() -> None:
    seen: list[Any] = []

    def helper(a: int, headers: Any = None, captured_headers: Any = None) -> None:
        seen.append(headers)

    wrapper = _without_uncaptured_headers(helper)
    assert wrapper is not None
    wrapper(1, headers=HEADERS, captured_headers=[])
    wrapper(1, headers=HEADERS, captured_headers=[".*"])
    wrapper(1, HEADERS, [])
    wrapper(1, HEADERS, ["a"])
    assert seen == [None, HEADERS, None, HEADERS]

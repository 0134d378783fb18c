"""GenAI client metrics recorded from lifecycle events.

Invariants:
- ``gen_ai.client.token.usage`` ({token}) gets one input and one output measurement per call
  that received a response, tagged ``gen_ai.token.type``; ``gen_ai.client.operation.duration``
  (s) gets one measurement per call, the call's total time (gates, semaphore and retries
  included: it is the duration the caller experienced), with ``error.type`` when it failed.
- ``gen_ai.client.operation.time_to_first_chunk`` (s) gets one measurement per streamed call
  that received a text delta: ``first_token.call_ttft_s``, from the call's start like the
  duration, with the duration's attributes.
- ``gen_ai.client.operation.time_per_output_chunk`` (s) gets one measurement per streamed call
  that received two text deltas or more, with the same attributes: the mean time per chunk
  after the first, ``(received.latency_s - first_token.ttft_s) / (chunks - 1)`` (both from the
  attempt's send: the first delta to the stream's end, over the deltas after the first). The
  convention records each chunk's own gap; the events carry no per-chunk times, so one mean
  per call stands for them (its count is calls, not chunks).
- The histograms use the explicit bucket boundaries of the GenAI semantic conventions.
- Attributes are the convention's low-cardinality ones only (operation, provider, OpenAI API
  type and response service tier, models, server); never call ids or metadata. Their dicts
  are built once per call shape and reused (bounded cache), so recording a call allocates
  no attribute dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.util.types import AttributeValue

from llmtrail.pipeline import Event, EventType

from . import _attributes as A

__all__ = ["GenAIMetrics", "scope_version"]


def scope_version() -> str:
    """llmtrail's version, the version of its instrumentation scope."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmtrail")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ""


class GenAIMetrics:
    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter(A.INSTRUMENTATION_SCOPE, scope_version(), A.SCHEMA_URL)
        self._token_usage = meter.create_histogram(
            A.GEN_AI_CLIENT_TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=A.TOKEN_USAGE_BUCKETS,
        )
        self._duration = meter.create_histogram(
            A.GEN_AI_CLIENT_OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=A.OPERATION_DURATION_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            A.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
            unit="s",
            description="Time to receive the first chunk in a streaming operation.",
            explicit_bucket_boundaries_advisory=A.OPERATION_DURATION_BUCKETS,
        )
        self._per_chunk = meter.create_histogram(
            A.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
            unit="s",
            description="Time per output chunk, recorded for each chunk received after the first "
            "one, measured as the time elapsed from the end of the previous chunk to the end of "
            "the current chunk.",
            explicit_bucket_boundaries_advisory=A.OPERATION_DURATION_BUCKETS,
        )
        # Attribute dicts per call shape, built once: the SDK only reads them.
        self._attrs: dict[_AttrKey, tuple[_Attrs, _Attrs, _Attrs]] = {}

    def record_call(self, events: Sequence[Event]) -> None:
        """Record one finished call (``trace_created`` .. ``completed``)."""
        received = first_token = None
        for event in reversed(events):
            if event.type is EventType.RECEIVED and received is None:
                received = event.payload
            elif event.type is EventType.FIRST_TOKEN and first_token is None:
                first_token = event.payload
        self.record(events[0], events[-1], received, first_token)

    def record(
        self,
        created: Event,
        completed: Event,
        received: dict[str, Any] | None,
        first_token: dict[str, Any] | None = None,
    ) -> None:
        """Record one finished call from its first and last events, its last response and,
        for a streamed call, its ``first_token`` payload."""
        start, end = created.payload, completed.payload
        outcome = end.get("outcome")
        key = (
            start.get("model"),
            received.get("response_model") if received is not None else None,
            received.get("service_tier") if received is not None else None,
            start.get("server_address"),
            start.get("server_port"),
            None if outcome == "succeeded" else str(end.get("error_type") or outcome),
            start.get("api"),
        )
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = _attribute_sets(*key)
            if len(self._attrs) > _MAX_ATTRIBUTE_SETS:
                # A model or server per call would be a cardinality bug upstream; stay bounded.
                self._attrs.clear()
        duration_attrs, input_attrs, output_attrs = attrs

        total_s = end.get("total_s")
        if isinstance(total_s, int | float) and total_s >= 0:
            self._duration.record(float(total_s), duration_attrs)
        ttft = first_token.get("call_ttft_s") if first_token is not None else None
        if isinstance(ttft, int | float) and ttft >= 0:
            self._ttft.record(float(ttft), duration_attrs)
        per_chunk = _time_per_chunk(first_token, received)
        if per_chunk is not None:
            self._per_chunk.record(per_chunk, duration_attrs)
        if received is None:
            return
        value = end.get("input_tokens")
        if isinstance(value, int) and value >= 0:
            self._token_usage.record(value, input_attrs)
        value = end.get("output_tokens")
        if isinstance(value, int) and value >= 0:
            self._token_usage.record(value, output_attrs)


def _time_per_chunk(
    first_token: dict[str, Any] | None, received: dict[str, Any] | None
) -> float | None:
    """A stream's mean time per output chunk after the first, or None when it had fewer than
    two chunks or its events lack a figure."""
    if first_token is None or received is None:
        return None
    chunks, latency, ttft = (
        received.get("chunks"),
        received.get("latency_s"),
        first_token.get("ttft_s"),
    )
    if not isinstance(chunks, int) or chunks < 2:
        return None
    if not isinstance(latency, int | float) or not isinstance(ttft, int | float):
        return None
    return max(0.0, float(latency) - float(ttft)) / (chunks - 1)


_Attrs = dict[str, AttributeValue]
_AttrKey = tuple[Any, Any, Any, Any, Any, str | None, Any]

# Distinct (model, response model, tier, server, error type, API) combinations kept precomputed.
_MAX_ATTRIBUTE_SETS = 1024


def _attribute_sets(
    model: Any,
    response_model: Any,
    service_tier: Any,
    address: Any,
    port: Any,
    error_type: str | None,
    api: Any,
) -> tuple[_Attrs, _Attrs, _Attrs]:
    """The duration's, the input tokens' and the output tokens' attributes for one call shape."""
    attrs: _Attrs = {
        A.GEN_AI_OPERATION_NAME: A.OPERATION_CHAT,
        A.GEN_AI_PROVIDER_NAME: A.PROVIDER_OPENAI,
        A.OPENAI_API_TYPE: A.api_type(api),
    }
    if isinstance(model, str):
        attrs[A.GEN_AI_REQUEST_MODEL] = model
    if isinstance(response_model, str):
        attrs[A.GEN_AI_RESPONSE_MODEL] = response_model
    if isinstance(service_tier, str):
        attrs[A.OPENAI_RESPONSE_SERVICE_TIER] = service_tier
    if isinstance(address, str):
        attrs[A.SERVER_ADDRESS] = address
    if isinstance(port, int) and not isinstance(port, bool):
        attrs[A.SERVER_PORT] = port
    duration = dict(attrs)
    if error_type is not None:
        duration[A.ERROR_TYPE] = error_type
    return (
        duration,
        {**attrs, A.GEN_AI_TOKEN_TYPE: A.TOKEN_TYPE_INPUT},
        {**attrs, A.GEN_AI_TOKEN_TYPE: A.TOKEN_TYPE_OUTPUT},
    )

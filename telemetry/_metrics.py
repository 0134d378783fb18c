"""GenAI client metrics recorded from lifecycle events.

Invariants:
- ``gen_ai.client.token.usage`` ({token}) gets one input and one output measurement per call
  that received a response, tagged ``gen_ai.token.type``; ``gen_ai.client.operation.duration``
  (s) gets one measurement per call, the call's total time (gates, semaphore and retries
  included: it is the duration the caller experienced), with ``error.type`` when it failed.
- Both histograms use the explicit bucket boundaries of the GenAI semantic conventions.
- Attributes are the convention's low-cardinality ones only (operation, provider, models,
  server); never call ids or metadata.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.util.types import AttributeValue

from pipeline import Event

from . import _attributes as A

__all__ = ["GenAIMetrics"]


class GenAIMetrics:
    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter(A.INSTRUMENTATION_SCOPE)
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

    def record(self, created: Event, completed: Event, received: dict[str, Any] | None) -> None:
        """Record one finished call from its first and last events and its last response."""
        start, end = created.payload, completed.payload
        attrs: dict[str, AttributeValue] = {
            A.GEN_AI_OPERATION_NAME: A.OPERATION_CHAT,
            A.GEN_AI_PROVIDER_NAME: A.PROVIDER_OPENAI,
        }
        model = start.get("model")
        if isinstance(model, str):
            attrs[A.GEN_AI_REQUEST_MODEL] = model
        if received is not None and isinstance(received.get("response_model"), str):
            attrs[A.GEN_AI_RESPONSE_MODEL] = received["response_model"]
        if isinstance(start.get("server_address"), str):
            attrs[A.SERVER_ADDRESS] = start["server_address"]
        if isinstance(start.get("server_port"), int):
            attrs[A.SERVER_PORT] = start["server_port"]

        duration_attrs = dict(attrs)
        if end.get("outcome") != "succeeded":
            duration_attrs[A.ERROR_TYPE] = str(end.get("error_type") or end.get("outcome"))
        total_s = end.get("total_s")
        if isinstance(total_s, int | float) and total_s >= 0:
            self._duration.record(float(total_s), duration_attrs)

        if received is None:
            return
        token_fields = (
            (A.TOKEN_TYPE_INPUT, "input_tokens"),
            (A.TOKEN_TYPE_OUTPUT, "output_tokens"),
        )
        for token_type, key in token_fields:
            value = end.get(key)
            if isinstance(value, int) and value >= 0:
                self._token_usage.record(value, {**attrs, A.GEN_AI_TOKEN_TYPE: token_type})

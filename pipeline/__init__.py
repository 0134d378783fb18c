"""llmtrail's request path: the public API, gates, semaphore, retries, providers and events."""

from __future__ import annotations

from ._errors import ConfigurationError, ErrorType, LLMTrailError, ServiceClosedError
from ._events import Event, EventType, Outcome, child_span_id
from ._pricing import ModelPrice, PriceTable
from ._types import GenerationRequest, GenerationResult, Timings, Usage
from .typing import EventSink, ProviderError, ProviderResponse

__all__ = [
    "ConfigurationError",
    "ErrorType",
    "Event",
    "EventSink",
    "EventType",
    "GenerationRequest",
    "GenerationResult",
    "LLMTrailError",
    "ModelPrice",
    "Outcome",
    "PriceTable",
    "ProviderError",
    "ProviderResponse",
    "ServiceClosedError",
    "Timings",
    "Usage",
    "child_span_id",
]

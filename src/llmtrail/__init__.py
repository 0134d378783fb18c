"""llmtrail: every LLM call through one rate-aware, observable pipeline.

The public API is re-exported here (``from llmtrail import BaseLLMService, GenerationRequest``);
the subpackages are ``llmtrail.pipeline`` (the request path), ``llmtrail.storage`` (the event
store, projections, replay), ``llmtrail.telemetry`` (spans, metrics, logging) and
``llmtrail.testing`` (the local server, fixtures and the store contract suite).

Importing this package is light and has no side effects: names load on first use, so
``import llmtrail.storage`` never imports the OpenAI SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

if TYPE_CHECKING:
    from .pipeline import (
        BaseLLMService,
        ConfigurationError,
        ErrorType,
        Event,
        EventSink,
        EventType,
        GenerationRequest,
        GenerationResult,
        Limits,
        LLMTrailError,
        ModelPrice,
        OpenAIResponsesProvider,
        Outcome,
        PriceTable,
        RetryPolicy,
        RetrySettings,
        ServiceClosedError,
        ServiceStats,
        StoreSettings,
        Timings,
        Usage,
    )

__all__ = [
    "BaseLLMService",
    "ConfigurationError",
    "ErrorType",
    "Event",
    "EventSink",
    "EventType",
    "GenerationRequest",
    "GenerationResult",
    "LLMTrailError",
    "Limits",
    "ModelPrice",
    "OpenAIResponsesProvider",
    "Outcome",
    "PriceTable",
    "RetryPolicy",
    "RetrySettings",
    "ServiceClosedError",
    "ServiceStats",
    "StoreSettings",
    "Timings",
    "Usage",
]

__getattr__ = lazy_names(__name__, dict.fromkeys(__all__, ".pipeline"))


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

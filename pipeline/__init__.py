"""llmtrail's request path: the public API, gates, semaphore, retries, providers and events.

Importing this package loads nothing else: every name loads with its module on first use, so
a module that needs one error type (the CLI's parser, ``llmtrail.storage``) never pays for the
OpenAI SDK, OpenTelemetry or asyncio's machinery of the request path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrail._lazy import lazy_names

if TYPE_CHECKING:
    from ._call import estimate_input_tokens
    from ._chat_provider import OpenAIChatProvider
    from ._clock import LoopClock, ManualClock, VirtualTimeLoop, run_virtual
    from ._errors import (
        ConfigurationError,
        ErrorType,
        LLMTrailError,
        MissingExtraError,
        ServiceClosedError,
        require_extra,
    )
    from ._events import Event, EventType, Outcome, child_span_id, default_instance, new_event_id
    from ._gates import GateRequestTooLarge, GateReservation, SlidingWindowGate
    from ._pricing import ModelPrice, PriceTable
    from ._provider import OpenAIResponsesProvider
    from ._provider_types import ProviderError, ProviderResponse
    from ._redis_gates import RateLimitBackendUnavailable, RedisSlidingWindowGate
    from ._retry import RetryPolicy
    from ._semaphore import FairSemaphore
    from ._service import BaseLLMService
    from ._settings import Limits, RetrySettings, StoreSettings
    from ._stats import OperationUsage, ServiceStats
    from ._stream import GenerationStream
    from ._types import GenerationRequest, GenerationResult, Timings, Usage
    from .typing import EventSink, ProviderStream

_LAZY = {
    "BaseLLMService": "._service",
    "child_span_id": "._events",
    "ConfigurationError": "._errors",
    "default_instance": "._events",
    "ErrorType": "._errors",
    "estimate_input_tokens": "._call",
    "Event": "._events",
    "EventSink": ".typing",
    "EventType": "._events",
    "FairSemaphore": "._semaphore",
    "GateRequestTooLarge": "._gates",
    "GateReservation": "._gates",
    "GenerationRequest": "._types",
    "GenerationResult": "._types",
    "GenerationStream": "._stream",
    "Limits": "._settings",
    "LLMTrailError": "._errors",
    "LoopClock": "._clock",
    "ManualClock": "._clock",
    "MissingExtraError": "._errors",
    "ModelPrice": "._pricing",
    "new_event_id": "._events",
    "OpenAIChatProvider": "._chat_provider",
    "OpenAIResponsesProvider": "._provider",
    "OperationUsage": "._stats",
    "Outcome": "._events",
    "PriceTable": "._pricing",
    "ProviderError": "._provider_types",
    "ProviderResponse": "._provider_types",
    "ProviderStream": ".typing",
    "RateLimitBackendUnavailable": "._redis_gates",
    "RedisSlidingWindowGate": "._redis_gates",
    "require_extra": "._errors",
    "RetryPolicy": "._retry",
    "RetrySettings": "._settings",
    "run_virtual": "._clock",
    "ServiceClosedError": "._errors",
    "ServiceStats": "._stats",
    "SlidingWindowGate": "._gates",
    "StoreSettings": "._settings",
    "Timings": "._types",
    "Usage": "._types",
    "VirtualTimeLoop": "._clock",
}

__getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "BaseLLMService",
    "ConfigurationError",
    "ErrorType",
    "Event",
    "EventSink",
    "EventType",
    "FairSemaphore",
    "GateRequestTooLarge",
    "GateReservation",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStream",
    "LLMTrailError",
    "Limits",
    "LoopClock",
    "MissingExtraError",
    "ManualClock",
    "ModelPrice",
    "OpenAIChatProvider",
    "OpenAIResponsesProvider",
    "OperationUsage",
    "Outcome",
    "PriceTable",
    "ProviderError",
    "ProviderResponse",
    "ProviderStream",
    "RateLimitBackendUnavailable",
    "RedisSlidingWindowGate",
    "RetryPolicy",
    "RetrySettings",
    "ServiceClosedError",
    "ServiceStats",
    "SlidingWindowGate",
    "StoreSettings",
    "Timings",
    "Usage",
    "VirtualTimeLoop",
    "child_span_id",
    "default_instance",
    "estimate_input_tokens",
    "new_event_id",
    "require_extra",
    "run_virtual",
]

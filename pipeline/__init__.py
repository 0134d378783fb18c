"""llmtrail's request path: the public API, gates, semaphore, retries, providers and events."""

from __future__ import annotations

from ._call import estimate_input_tokens
from ._clock import LoopClock, ManualClock, VirtualTimeLoop, run_virtual
from ._errors import ConfigurationError, ErrorType, LLMTrailError, ServiceClosedError
from ._events import Event, EventType, Outcome, child_span_id, default_instance, new_event_id
from ._gates import GateRequestTooLarge, GateReservation, SlidingWindowGate
from ._pricing import ModelPrice, PriceTable
from ._provider import OpenAIResponsesProvider
from ._redis_gates import RateLimitBackendUnavailable, RedisSlidingWindowGate
from ._retry import RetryPolicy
from ._semaphore import FairSemaphore
from ._service import BaseLLMService
from ._stats import OperationUsage, ServiceStats
from ._types import GenerationRequest, GenerationResult, Timings, Usage
from .typing import EventSink, ProviderError, ProviderResponse

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
    "LLMTrailError",
    "LoopClock",
    "ManualClock",
    "ModelPrice",
    "OpenAIResponsesProvider",
    "OperationUsage",
    "Outcome",
    "PriceTable",
    "ProviderError",
    "ProviderResponse",
    "RateLimitBackendUnavailable",
    "RedisSlidingWindowGate",
    "RetryPolicy",
    "ServiceClosedError",
    "ServiceStats",
    "SlidingWindowGate",
    "Timings",
    "Usage",
    "VirtualTimeLoop",
    "child_span_id",
    "default_instance",
    "estimate_input_tokens",
    "new_event_id",
    "run_virtual",
]

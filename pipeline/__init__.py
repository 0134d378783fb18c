"""llmtrail's request path: the public API, gates, semaphore, retries, providers and events.

Importing this package is light: the service and the provider (which import the OpenAI SDK)
load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrail._lazy import lazy_names

from ._call import estimate_input_tokens
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
from ._provider_types import ProviderError, ProviderResponse
from ._redis_gates import RateLimitBackendUnavailable, RedisSlidingWindowGate
from ._retry import RetryPolicy
from ._semaphore import FairSemaphore
from ._settings import Limits, RetrySettings, StoreSettings
from ._stats import OperationUsage, ServiceStats
from ._types import GenerationRequest, GenerationResult, Timings, Usage
from .typing import EventSink, ProviderStream

if TYPE_CHECKING:
    from ._chat_provider import OpenAIChatProvider
    from ._provider import OpenAIResponsesProvider
    from ._service import BaseLLMService
    from ._stream import GenerationStream

# The OpenAI SDK takes about a second to import, so the names that need it load on first use:
# `import llmtrail.storage` (which needs only the event types) never pays for it.
_LAZY = {
    "BaseLLMService": "._service",
    "GenerationStream": "._stream",
    "OpenAIChatProvider": "._chat_provider",
    "OpenAIResponsesProvider": "._provider",
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

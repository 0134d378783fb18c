"""Error vocabulary: the ``error_type`` of failed calls, and the exceptions llmtrail raises.

Provider and network failures never raise out of ``execute_generation*``: they come back as a
``GenerationResult`` with ``success=False`` and one of the :class:`ErrorType` values. What does
raise is misuse: bad configuration (:class:`ConfigurationError`), and cancellation, which is
always re-raised.
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from types import ModuleType

__all__ = [
    "ConfigurationError",
    "ErrorType",
    "LLMTrailError",
    "MissingExtraError",
    "ServiceClosedError",
    "require_extra",
]


class ErrorType(StrEnum):
    RATE_LIMITED = "rate_limited"  # 429 rate_limit_exceeded: retryable
    QUOTA_EXCEEDED = "quota_exceeded"  # 429 insufficient_quota: not retryable
    TIMEOUT = "timeout"  # the request timeout expired, or 408
    CONNECTION = "connection"  # refused, reset, dropped
    SERVER_ERROR = "server_error"  # 5xx
    CONFLICT = "conflict"  # 409
    BAD_REQUEST = "bad_request"  # 400, 404, 422
    AUTH = "auth"  # 401, 403
    INVALID_RESPONSE = "invalid_response"  # not JSON, no usage, schema mismatch
    # A streamed answer broke after its first byte (connection lost, read timeout, an error
    # event): never retried, since part of it may already be with the caller.
    STREAM_BROKEN = "stream_broken"
    TOO_LARGE = "too_large"  # the request can never fit the configured TPM window
    LIMITER_UNAVAILABLE = "limiter_unavailable"  # the shared rate limiter (Redis) is down
    STORE_UNAVAILABLE = "store_unavailable"  # the event store could not log it: not sent
    VALIDATION = "validation"  # the GenerationRequest itself is invalid
    INTERNAL = "internal"  # a bug in llmtrail or in a sink: reported, never raised
    CANCELLED = "cancelled"


class LLMTrailError(Exception):
    """Base class of the exceptions llmtrail raises."""


class ConfigurationError(LLMTrailError, ValueError):
    """A constructor argument or environment variable is invalid; the message names the fix."""


class ServiceClosedError(LLMTrailError, RuntimeError):
    """The service was used after ``aclose()`` / ``close()``."""


class MissingExtraError(ConfigurationError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""


def require_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that installs it.

    The core install holds the request path, the SQLite store and OTLP tracing; PostgreSQL,
    Redis, replay's charts and the local server come with extras (``postgres``, ``redis``,
    ``replay``, ``server``), so their imports go through here to fail with one clear line.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{feature} needs {module}, which is not installed: pip install 'llmtrail[{extra}]'"
        ) from None

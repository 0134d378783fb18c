"""What one HTTP attempt comes back as, whichever the provider: a :class:`ProviderResponse`,
or a :class:`ProviderError` that says what went wrong and whether to retry.

Invariants:
- Token counts are non-negative ints; ``cost`` is not here (the flow prices a response).
- ``ProviderError.reached_provider`` is False only when the request certainly never arrived
  (the connection was refused), so its rate-gate slot can be given back.
- Messages never hold a secret: providers redact them before they build the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ErrorType

__all__ = ["ProviderError", "ProviderResponse"]


@dataclass(slots=True)
class ProviderResponse:
    """What one successful HTTP attempt returned, in provider-neutral terms."""

    content: Any
    raw_content: str
    response_id: str | None
    response_model: str | None
    finish_reasons: list[str]
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    status: int = 200
    provider_request_id: str | None = None
    rate_limits: dict[str, str] = field(default_factory=dict)
    service_tier: str | None = None  # the tier that served the request, when reported
    # The provider's own time on the request (``openai-processing-ms``), when it says.
    processing_s: float | None = None


class ProviderError(Exception):
    """One failed HTTP attempt, classified."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
        provider_code: str | None = None,
        provider_request_id: str | None = None,
        rate_limits: Mapping[str, str] | None = None,
        reached_provider: bool = True,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.provider_code = provider_code
        self.provider_request_id = provider_request_id
        self.rate_limits = dict(rate_limits or {})
        self.reached_provider = reached_provider

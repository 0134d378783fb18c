"""Retry policy: tenacity is the single retry layer (the SDK's own retries are off).

Invariants:
- Retried: 429 rate_limit_exceeded, 408, 409, 5xx, timeouts and connection errors.
  Never retried: insufficient_quota, 400, 401, 403, 404, 422, invalid responses.
- The provider's ``retry-after-ms`` / ``retry-after`` wins over backoff; otherwise the wait is
  full-jitter exponential backoff, capped. A retry-after longer than ``max_retry_wait_s`` is
  not waited for: the call fails with the provider's error instead of hanging.
- Waits run on the service's clock, so virtual-time replays never sleep for real.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ._errors import ConfigurationError
from ._provider_types import ProviderError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    max_retry_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ConfigurationError(
                f"max_attempts={self.max_attempts!r} is invalid: use an int >= 1"
            )
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.max_retry_wait_s < 0:
            raise ConfigurationError("retry waits must be >= 0 seconds")

    def should_retry(self, exc: BaseException) -> bool:
        if not isinstance(exc, ProviderError) or not exc.retryable:
            return False
        return exc.retry_after_s is None or exc.retry_after_s <= self.max_retry_wait_s

    def wait_for(self, state: RetryCallState) -> float:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, ProviderError) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return float(self._backoff(state))

    @property
    def _backoff(self) -> wait_random_exponential:
        return wait_random_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s)

    def retrying(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]],
        before_sleep: Callable[[RetryCallState], None],
    ) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self.wait_for,
            retry=retry_if_exception(self.should_retry),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

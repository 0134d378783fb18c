"""Live figures of a service: current RPM/TPM, queue depths, per-operation usage.

Invariants:
- Money is summed as ``Decimal``; an unpriced call adds to ``unpriced_calls``, never to cost.
- The rate meter counts every HTTP attempt (RPM) and every received token (TPM) over the last
  60 s of the service's clock; it is independent of whether limits are configured.
- ``max_rpm`` / ``max_tpm`` of ``None`` mean no gate: :attr:`ServiceStats.gates` says so in
  words, with the fix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

from ._types import GenerationResult

__all__ = ["OperationUsage", "RateMeter", "ServiceStats"]


@dataclass(slots=True)
class OperationUsage:
    calls: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)
    unpriced_calls: int = 0

    def add(self, result: GenerationResult, *, cancelled: bool = False) -> None:
        """Count one finished call; a cancelled one adds the tokens it was billed for (a
        stream abandoned after its first token), like the projections do."""
        self.calls += 1
        if cancelled:
            self.cancelled += 1
        elif result.success:
            self.succeeded += 1
        else:
            self.failed += 1
        usage = result.usage
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cached_tokens
        self.output_tokens += usage.output_tokens
        self.reasoning_tokens += usage.reasoning_tokens
        if usage.cost_usd is not None:
            self.cost_usd += usage.cost_usd
        elif usage.input_tokens or usage.output_tokens:
            self.unpriced_calls += 1


@dataclass(slots=True, frozen=True)
class ServiceStats:
    rpm: int
    tpm: int
    in_flight: int
    waiting_rpm: int
    waiting_tpm: int
    waiting_semaphore: int
    reserved_tokens: int
    usage: dict[str, OperationUsage]
    # The configured limits; None means that gate is not set (nothing holds that rate back).
    max_rpm: int | None = None
    max_tpm: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def waiting(self) -> int:
        return self.waiting_rpm + self.waiting_tpm + self.waiting_semaphore

    @property
    def gates(self) -> str:
        """In words: which rate gates hold calls back, and what a missing one means."""
        unset = [
            name
            for name, limit in (("max_rpm", self.max_rpm), ("max_tpm", self.max_tpm))
            if limit is None
        ]
        set_ = [
            f"{label} gate {limit}/min"
            for label, limit in (("RPM", self.max_rpm), ("TPM", self.max_tpm))
            if limit is not None
        ]
        if not unset:
            return ", ".join(set_)
        bound = (
            f"max_concurrent_requests={self.max_concurrent_requests}"
            if self.max_concurrent_requests
            else "the semaphore"
        )
        return (
            ", ".join([*set_, f"no {' or '.join(unset)} gate"])
            + f": calls are held back only by {bound}, and the provider answers over its own "
            "limits with 429s (retried); set "
            + " and ".join(unset)
            + " (or LLMTRAIL_MAX_RPM / LLMTRAIL_MAX_TPM) to the provider's limits"
        )


class RateMeter:
    """Requests sent and tokens received in the trailing 60 seconds."""

    __slots__ = ("_sends", "_tokens", "_token_sum")

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._sends: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._token_sum = 0

    def on_send(self, now: float) -> None:
        self._sends.append(now)
        self.rpm(now)  # trim as we go, so memory stays bounded by one minute of traffic

    def on_tokens(self, now: float, tokens: int) -> None:
        self._tokens.append((now, tokens))
        self._token_sum += tokens
        self.tpm(now)

    def rpm(self, now: float) -> int:
        horizon = now - self.WINDOW_S
        sends = self._sends
        while sends and sends[0] <= horizon:
            sends.popleft()
        return len(sends)

    def tpm(self, now: float) -> int:
        horizon = now - self.WINDOW_S
        tokens = self._tokens
        while tokens and tokens[0][0] <= horizon:
            self._token_sum -= tokens.popleft()[1]
        return self._token_sum

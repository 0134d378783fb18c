"""Replay settings, the modelled provider and traffic scaling: the inputs of a replay.

Invariants:
- :class:`ReplaySettings` is immutable and validated when built: a bad knob raises
  :class:`~pipeline.ConfigurationError` naming the value and the fix.
- :class:`ProviderModel` models the *provider's* own limit, not our gates: one sliding window of
  admitted arrivals, capacity ``limit * window_s / 60``, a 429 carrying the time until there
  is room. It never reuses or reimplements the gates' logic.
- :func:`scaled_calls` is deterministic: compression has no randomness, resampling draws from
  ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from llmtrail.pipeline import ConfigurationError, FairSemaphore, RetryPolicy

from ._workload import RecordedCall, Workload

__all__ = ["KNOBS", "ProviderModel", "ReplaySettings", "scaled_calls"]

_SCALE_METHODS = ("compress", "resample")


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """The knobs of one replay. ``None`` limits mean no limit."""

    max_rpm: int | None = None
    max_tpm: int | None = None
    window_s: float = 60.0
    max_concurrent_requests: int = 100
    max_attempts: int = 3
    send_guard_s: float | None = None
    unanswered_guard_s: float = 1.0
    scale: float = 1.0
    scale_method: str = "compress"
    seed: int = 0
    provider_rpm: int | None = None
    provider_tpm: int | None = None
    provider_window_s: float = 60.0
    provider_429_latency_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_rpm", "max_tpm", "provider_rpm", "provider_tpm"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name}={value!r} is invalid: use an int >= 1, or none")
        for name in ("window_s", "provider_window_s", "scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"{name}={value!r} is invalid: use a number > 0")
        for name in ("provider_429_latency_s", "send_guard_s", "unanswered_guard_s"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigurationError(f"{name}={value!r} is invalid: use a number >= 0")
        if self.scale_method not in _SCALE_METHODS:
            raise ConfigurationError(
                f"scale_method={self.scale_method!r} is invalid: use one of {_SCALE_METHODS}"
            )
        # The semaphore and the retry policy validate their own arguments.
        FairSemaphore(self.max_concurrent_requests)
        RetryPolicy(self.max_attempts)

    @classmethod
    def recorded(cls, workload: Workload, **overrides: Any) -> ReplaySettings:
        """The settings the workload was recorded with, with ``overrides`` applied."""
        s = workload.settings
        base = cls(
            max_rpm=s.max_rpm,
            max_tpm=s.max_tpm,
            window_s=s.window_s,
            max_concurrent_requests=s.max_concurrent_requests,
            max_attempts=s.max_attempts,
            send_guard_s=s.send_guard_s,
            unanswered_guard_s=s.unanswered_guard_s,
        )
        return base.with_(**overrides)

    def with_(self, **overrides: Any) -> ReplaySettings:
        known = sorted(f.name for f in fields(self))
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ConfigurationError(f"unknown replay setting(s) {unknown}; known: {known}")
        return replace(self, **overrides)

    @property
    def provider_model(self) -> bool:
        return self.provider_rpm is not None or self.provider_tpm is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The knobs a sweep may vary, by the names users type (aliases map to the setting's name).
KNOBS: dict[str, str] = {
    "max_rpm": "max_rpm",
    "max_tpm": "max_tpm",
    "window": "window_s",
    "window_s": "window_s",
    "rpm_window_seconds": "window_s",
    "max_concurrent": "max_concurrent_requests",
    "max_concurrent_requests": "max_concurrent_requests",
    "scale": "scale",
    "provider_rpm": "provider_rpm",
    "provider_tpm": "provider_tpm",
}


# -- the modelled provider --------------------------------------------------------------------


class ProviderModel:
    """A provider's own rate limit: one sliding window of admitted arrivals ``(t, tokens)``.

    This models the *provider*, not our gates: capacity ``limit * window_s / 60``, a request
    counted when it arrives and for ``window_s`` after, a 429 carrying the time until there is
    room. A request larger than the whole token window gets a 429 without retry-after.
    """

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0) -> None:
        scale = window_s / 60.0
        # The epsilon keeps 240 * 1 / 60 from flooring to 3 through float error.
        self.cap_requests = math.floor(rpm * scale + 1e-9) if rpm else None
        self.cap_tokens = math.floor(tpm * scale + 1e-9) if tpm else None
        for cap in (self.cap_requests, self.cap_tokens):
            if cap is not None and cap < 1:
                raise ConfigurationError(
                    f"the provider limit allows {cap} per {window_s}s window: raise "
                    "provider_rpm/provider_tpm or provider_window_s"
                )
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self.rejected = 0

    def _purge(self, now: float) -> None:
        entries, window = self._entries, self.window_s
        while entries and entries[0][0] + window <= now:
            self._tokens -= entries.popleft()[1]

    def arrive(self, now: float, tokens: int) -> tuple[bool, float | None]:
        """(admitted, retry_after_s) for a request arriving at ``now``."""
        self._purge(now)
        if self.cap_tokens is not None and tokens > self.cap_tokens:
            self.rejected += 1
            return False, None
        need_requests = (
            len(self._entries) + 1 - self.cap_requests if self.cap_requests is not None else 0
        )
        need_tokens = self._tokens + tokens - self.cap_tokens if self.cap_tokens is not None else 0
        if need_requests <= 0 and need_tokens <= 0:
            self._entries.append((now, tokens))
            self._tokens += tokens
            return True, None
        self.rejected += 1
        until = 0.0
        freed_tokens = 0
        for freed_requests, (t, cost) in enumerate(self._entries):
            if freed_requests >= need_requests and freed_tokens >= need_tokens:
                break
            freed_tokens += cost
            until = t + self.window_s - now
        return False, max(until, 0.001)

    def headers(self, now: float) -> tuple[int | None, int | None, float]:
        """(remaining requests, remaining tokens, seconds until the window is empty)."""
        self._purge(now)
        reset = self._entries[-1][0] + self.window_s - now if self._entries else 0.0
        requests = self.cap_requests - len(self._entries) if self.cap_requests is not None else None
        tokens = self.cap_tokens - self._tokens if self.cap_tokens is not None else None
        return requests, tokens, reset


# -- scaling ----------------------------------------------------------------------------------


def scaled_calls(workload: Workload, settings: ReplaySettings) -> list[tuple[float, RecordedCall]]:
    """``(arrival_s, call)`` in arrival order, with the traffic scale applied (module docs)."""
    calls = workload.calls
    k = settings.scale
    if k == 1.0:
        return [(c.arrival_s, c) for c in calls]
    if settings.scale_method == "compress":
        return [(c.arrival_s / k, c) for c in calls]
    rng = random.Random(settings.seed)
    n = len(calls)
    count = max(round(k * n), 1)
    picked: list[tuple[float, RecordedCall]] = []
    for _ in range(count):
        pos = rng.random() * (n - 1)
        j = int(pos)
        frac = pos - j
        if j + 1 < n:
            at = calls[j].arrival_s + frac * (calls[j + 1].arrival_s - calls[j].arrival_s)
            picked.append((at, calls[j + 1] if frac >= 0.5 else calls[j]))
        else:
            picked.append((calls[j].arrival_s, calls[j]))
    picked.sort(key=lambda item: item[0])
    return picked

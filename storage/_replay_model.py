"""Replay settings, the modelled provider, its errors and traffic scaling: a replay's inputs.

Invariants:
- :class:`ReplaySettings` is immutable and validated when built: a bad knob raises
  :class:`~pipeline.ConfigurationError` naming the value and the fix.
- :class:`ProviderModel` models the *provider's* own limit, not our gates: one sliding window,
  capacity ``limit * window_s / 60``, counting every arrival (a request it refuses with a 429
  counts too, without tokens, as OpenAI documents; ``provider_counts_rejected=False`` turns that
  off), and each 429 carrying its own retry-after: the time until the window has room for that
  request, given everything counted before it. It never reuses or reimplements the gates.
- :class:`FaultModel` is the provider's other errors as recorded: the share of the attempts that
  reached it which failed, by kind (error type, status), each with its recorded latency and
  retry-after. Limit 429s are not faults when the provider model decides them.
- An attempt's replayed time (:func:`attempt_time`) never counts the time a gate held it at
  the wire in the recording: the replay's gates hold it themselves. The client's CPU per
  attempt (:func:`calibrated_client_cpu`) is calibrated on the same times.
- :func:`scaled_calls` is deterministic: compression has no randomness, resampling draws from
  ``random.Random(seed)``; so are the fault draws of a replay (``seed``).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

from llmtrail.pipeline import ConfigurationError, FairSemaphore, RetryPolicy

from ._workload import RecordedAttempt, RecordedCall, Workload

__all__ = [
    "KNOBS",
    "Fault",
    "FaultModel",
    "ProviderModel",
    "ReplaySettings",
    "attempt_time",
    "calibrated_client_cpu",
    "provider_defaults",
    "scaled_calls",
    "usual_pre_write",
    "waited_at_a_gate",
]

_SCALE_METHODS = ("compress", "resample")


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    """The knobs of one replay. ``None`` limits mean no limit."""

    max_rpm: int | None = None
    max_tpm: int | None = None
    window_s: float = 60.0
    max_concurrent_requests: int = 100
    max_attempts: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    max_retry_wait_s: float = 60.0
    send_guard_s: float | None = None
    unanswered_guard_s: float = 1.0
    arrival_guard_s: float = 0.1
    scale: float = 1.0
    scale_method: str = "compress"
    seed: int = 0
    provider_rpm: int | None = None
    provider_tpm: int | None = None
    provider_window_s: float = 60.0
    provider_429_latency_s: float = 0.005
    provider_counts_rejected: bool = True
    # None: an attempt takes its recorded latency (provider + the client's time as recorded),
    # after the recorded write-ahead of its `sent` event; a number: the provider's own time
    # plus this much client CPU per attempt (which stands for both), served one call at a time
    # (one event loop), so that a busier client queues for it.
    client_cpu_s: float | None = None
    # Retries and errors: "recorded" replays each call's attempts as they happened; "modelled"
    # draws each attempt's outcome from the provider model and the FaultModel. None: modelled
    # when the provider model is on or the retry knobs differ from the recording's.
    errors: str | None = None

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
        for name in (
            "provider_429_latency_s",
            "send_guard_s",
            "unanswered_guard_s",
            "arrival_guard_s",
            "client_cpu_s",
            "backoff_base_s",
            "backoff_max_s",
            "max_retry_wait_s",
        ):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigurationError(f"{name}={value!r} is invalid: use a number >= 0")
        if self.scale_method not in _SCALE_METHODS:
            raise ConfigurationError(
                f"scale_method={self.scale_method!r} is invalid: use one of {_SCALE_METHODS}"
            )
        if self.errors not in (None, "recorded", "modelled"):
            raise ConfigurationError(
                f"errors={self.errors!r} is invalid: use 'recorded', 'modelled' or None (auto)"
            )
        if self.errors == "recorded" and self.provider_model:
            raise ConfigurationError(
                "errors='recorded' replays each call's recorded attempts, so a provider model "
                "cannot decide its 429s: use errors='modelled' (or auto), or drop the "
                "provider limits"
            )
        # The semaphore and the retry policy validate their own arguments.
        FairSemaphore(self.max_concurrent_requests)
        self.retry_policy()

    def retry_policy(self) -> RetryPolicy:
        """The production retry policy these knobs configure."""
        return RetryPolicy(
            self.max_attempts, self.backoff_base_s, self.backoff_max_s, self.max_retry_wait_s
        )

    def modelled_errors(self, workload: Workload) -> bool:
        """Whether attempts' outcomes are drawn (see ``errors``) rather than replayed."""
        if self.errors is not None:
            return self.errors == "modelled"
        defaults = ReplaySettings()
        return (
            self.provider_model
            or self.max_attempts != workload.settings.max_attempts
            or self.backoff_base_s != defaults.backoff_base_s
            or self.backoff_max_s != defaults.backoff_max_s
            or self.max_retry_wait_s != defaults.max_retry_wait_s
        )

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
            arrival_guard_s=s.arrival_guard_s,
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
    "max_attempts": "max_attempts",
    "backoff": "backoff_base_s",
    "backoff_base_s": "backoff_base_s",
    "backoff_max_s": "backoff_max_s",
    "client_cpu": "client_cpu_s",
    "client_cpu_s": "client_cpu_s",
}


# -- the modelled provider --------------------------------------------------------------------


class ProviderModel:
    """A provider's own rate limit: one sliding window of counted arrivals ``(t, tokens)``.

    This models the *provider*, not our gates (module docs). :meth:`check` is the limit's
    verdict on an arrival (a refused one is counted at once when ``counts_rejected``);
    :meth:`count` counts one it served (or failed after seeing it). A request larger than the
    whole token window gets a 429 without retry-after.
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        window_s: float = 60.0,
        *,
        counts_rejected: bool = True,
    ) -> None:
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
        self.counts_rejected = counts_rejected
        self._entries: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self.rejected = 0

    def _purge(self, now: float) -> None:
        entries, window = self._entries, self.window_s
        while entries and entries[0][0] + window <= now:
            self._tokens -= entries.popleft()[1]

    def check(self, now: float, tokens: int) -> tuple[bool, float | None]:
        """(within the limit, retry_after_s) for a request arriving at ``now``."""
        self._purge(now)
        if self.cap_tokens is not None and tokens > self.cap_tokens:
            self.rejected += 1
            return False, None
        need_requests = (
            len(self._entries) + 1 - self.cap_requests if self.cap_requests is not None else 0
        )
        need_tokens = self._tokens + tokens - self.cap_tokens if self.cap_tokens is not None else 0
        if need_requests <= 0 and need_tokens <= 0:
            return True, None
        self.rejected += 1
        until = 0.0
        freed_tokens = 0
        for freed_requests, (t, cost) in enumerate(self._entries):
            if freed_requests >= need_requests and freed_tokens >= need_tokens:
                break
            freed_tokens += cost
            until = t + self.window_s - now
        if self.counts_rejected:
            self._entries.append((now, 0))
        return False, max(math.ceil(until * 1000 - 1e-6) / 1000, 0.001)

    def count(self, now: float, tokens: int) -> None:
        self._entries.append((now, tokens))
        self._tokens += tokens

    def headers(self, now: float) -> tuple[int | None, int | None, float]:
        """(remaining requests, remaining tokens, seconds until the window is empty)."""
        self._purge(now)
        reset = self._entries[-1][0] + self.window_s - now if self._entries else 0.0
        requests = (
            max(self.cap_requests - len(self._entries), 0)
            if self.cap_requests is not None
            else None
        )
        tokens = max(self.cap_tokens - self._tokens, 0) if self.cap_tokens is not None else None
        return requests, tokens, reset


class Fault(NamedTuple):
    error_type: str
    status: int | None
    retryable: bool
    latency_s: float  # the median recorded latency of this kind
    retry_after_s: float | None  # the median recorded retry-after, if it had one


class FaultModel:
    """The provider's errors other than its limit, as recorded (module docs).

    ``draw(u)`` maps a uniform draw to a fault (or None: answered): the faults take the
    lowest ``share`` of [0, 1), in a fixed order.
    """

    def __init__(self, workload: Workload, *, limit_429s: bool) -> None:
        """``limit_429s``: count recorded limit 429s as faults (when no provider model
        decides them)."""
        reached = 0
        kinds: dict[tuple[str, int | None, bool], tuple[list[float], list[float]]] = {}
        for call in workload.calls:
            for a in call.attempts:
                if not a.reached or a.error_type == "cancelled":
                    continue
                if a.limit_hit and not limit_429s:
                    continue
                reached += 1
                if a.error_type is None:
                    continue
                latencies, retry_afters = kinds.setdefault(
                    (a.error_type, a.status, a.retryable), ([], [])
                )
                latencies.append(a.latency_s)
                if a.retry_after_s is not None:
                    retry_afters.append(a.retry_after_s)
        self.reached = reached
        self.faults: list[tuple[float, Fault]] = []
        for (error_type, status, retryable), (latencies, retry_afters) in sorted(
            kinds.items(), key=lambda item: (item[0][0], item[0][1] or 0)
        ):
            fault = Fault(
                error_type,
                status,
                retryable,
                statistics.median(latencies),
                statistics.median(retry_afters) if retry_afters else None,
            )
            self.faults.append((len(latencies) / reached, fault))

    def draw(self, u: float) -> Fault | None:
        for share, fault in self.faults:
            if u < share:
                return fault
            u -= share
        return None

    def describe(self) -> str:
        if not self.faults:
            return "no provider errors recorded"
        parts = [
            f"{share:.1%} {f.error_type} ({f.status or 'no status'})" for share, f in self.faults
        ]
        return f"of {self.reached:,} recorded attempts: " + ", ".join(parts)


# -- the provider's limits --------------------------------------------------------------------


def provider_defaults(
    workload: Workload, settings: ReplaySettings, *, window_given: bool = False
) -> tuple[ReplaySettings, list[str]]:
    """``settings`` with the provider model turned on when the client gate is looser than the
    provider's known limit, and the notes saying so (or saying that no limit is known).

    The known limit is the one given (``provider_rpm``/``provider_tpm``), else the one the
    provider stated in its rate-limit headers during the recording.
    """
    notes: list[str] = []
    stated = workload.provider_limits
    if settings.provider_model:
        return settings, notes
    gates = (("rpm", settings.max_rpm), ("tpm", settings.max_tpm))
    if stated is None or (stated.rpm is None and stated.tpm is None):
        recorded = workload.settings
        loosened = [
            f"max_{name}={limit}"
            for (name, limit), before in zip(
                gates, (recorded.max_rpm, recorded.max_tpm), strict=True
            )
            if before is not None and (limit is None or limit > before)
        ]
        if loosened:
            notes.append(
                f"{', '.join(loosened)} is looser than the recorded gate, and the recording "
                "states no provider limit (no x-ratelimit-limit-* header, or only 'unlimited' "
                "ones): this replay assumes a provider that never refuses a request. Give "
                "--provider-rpm / --provider-tpm to model its limit."
            )
        return settings, notes
    looser = [
        (name, limit, known)
        for (name, limit), known in zip(gates, (stated.rpm, stated.tpm), strict=True)
        if known is not None and (limit is None or limit > known)
    ]
    if not looser:
        return settings, notes
    window = settings.provider_window_s
    if not window_given and stated.window_s is not None:
        window = stated.window_s
    on = settings.with_(provider_rpm=stated.rpm, provider_tpm=stated.tpm, provider_window_s=window)
    what = ", ".join(
        f"max_{n}={limit} is looser than its {known:,} {n.upper()}" for n, limit, known in looser
    )
    notes.append(
        f"provider model ON: {what} (stated in its rate-limit headers); it enforces "
        f"{stated.rpm or 'no'} RPM / {stated.tpm or 'no'} TPM over a {window:g} s window"
        + ("" if window_given or stated.window_s is None else " (the longest reset it stated)")
    )
    return on, notes


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


def attempt_time(
    attempt: RecordedAttempt, client_cpu: bool, pre_write_s: float | None = None
) -> float:
    """The provider's part of an attempt: its own time when client CPU is modelled separately
    and recorded, else the recorded latency. The recorded latency counts from ``sent``, so it
    includes the time a gate that granted ahead held the request at the wire; the replay holds
    it itself (``Simulation._send``). With ``pre_write_s`` (the client's usual time to write a
    body, given for calls that waited at a gate), what its body took beyond that is taken out."""
    if client_cpu and attempt.provider_s is not None:
        return attempt.provider_s
    sent = attempt.body_sent_s
    if pre_write_s is not None and sent is not None and sent > pre_write_s:
        return attempt.latency_s - (sent - pre_write_s)
    return attempt.latency_s


def waited_at_a_gate(call: RecordedCall) -> bool:
    """Did the call wait at a gate (and so may have been held at the wire)?"""
    return bool(call.rpm_wait_s or call.tpm_wait_s or call.retry_gate_waits)


def usual_pre_write(workload: Workload) -> float | None:
    """The client's usual time from ``sent`` to the body written when no gate held it: the
    median over the first attempts of calls that waited at no gate (else the shortest of all);
    None when the recording had no send-time hook."""
    free, every = [], []
    for c in workload.calls:
        sent = c.attempts[0].body_sent_s if c.attempts else None
        if sent is not None:
            every.append(sent)
            if not waited_at_a_gate(c):
                free.append(sent)
    if free:
        return statistics.median(free)
    return min(every) if every else None


def calibrated_client_cpu(workload: Workload) -> float | None:
    """The client's CPU time per attempt, from the recording; None when no provider time was
    recorded.

    What the client adds to an attempt (the write-ahead of its ``sent`` event, and its recorded
    latency less any time a gate held it at the wire minus the provider's own time) is its CPU
    time c plus the time it queued behind other
    attempts' CPU work on its one event loop. Taking the attempts as arriving at the recorded
    rate (attempts per second, from the first arrival to the last answer) at a single server
    of service time c, the M/D/1 mean wait gives the mean of what was added:
    W = c + rate x c^2 / (2 (1 - rate x c)); c is the root of that quadratic.
    """
    overheads: list[float] = []
    pre_write = usual_pre_write(workload)
    for c in workload.calls:
        held = pre_write if waited_at_a_gate(c) else None
        for a in c.attempts:
            if a.error_type is None and a.provider_s is not None:
                added = attempt_time(a, False, held) - a.provider_s + a.pre_send_s
                overheads.append(max(added, 0.0))
    if not overheads:
        return None
    mean = statistics.fmean(overheads)
    span = max(max(c.finished_s for c in workload.calls), 1e-9)
    rate = len(overheads) / span
    if rate * mean < 1e-9:
        return mean
    b = 2.0 + 2.0 * mean * rate
    return (b - math.sqrt(b * b - 8.0 * rate * mean)) / (2.0 * rate)

"""The local server's configuration, request log, rate window and prompt cache.

Split out of :mod:`llmtrail.testing._mock_server` (which re-exports every public name here) so
that each module stays small. See that module for the behaviour these pieces implement.

Invariants:
- A :class:`MockServerConfig` is validated when built: an invalid value raises ValueError
  naming the field and the fix.
- :class:`_Window` holds counted arrivals ``(t, tokens)`` in arrival order; an entry leaves at
  ``t + window_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "ORGANIZATION",
    "UNLIMITED",
    "Fault",
    "LogRecord",
    "MockServerConfig",
    "format_duration",
    "max_arrivals_in_window",
]

UNLIMITED = 1_000_000_000  # the limit reported in headers when no limit is configured
ORGANIZATION = "org-mock"
_RATE_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_CACHE_MIN_TOKENS = 1024
_CACHE_STEP_CHARS = 128 * 4
_CACHE_MAX_ENTRIES = 200_000  # the prefix set is cleared when it grows past this


class Fault(StrEnum):
    """An injected fault, as recorded in the log."""

    HTTP_500 = "http_500"  # 500, type server_error
    HTTP_503 = "http_503"  # 503, type server_error
    RATE_LIMIT_429 = "rate_limit_429"  # 429 rate_limit_exceeded with retry-after, not counted
    # A normal answer after slow_s instead of the latency; a stream stalls after in_progress.
    SLOW = "slow"
    HANG = "hang"  # never answers; the handler waits until the client goes away
    DROP = "drop"  # the socket is closed without any response
    MALFORMED_JSON = "malformed_json"  # 200 with a truncated JSON body (or SSE event)
    MISSING_USAGE = "missing_usage"  # 200 with a valid response whose usage is null
    # A stream cut after half its text deltas (the socket closed mid-body); a plain answer is
    # dropped like DROP.
    STREAM_BREAK = "stream_break"
    # 400 whose message echoes the request's credentials (Authorization and any *-token or
    # *-key header), as some providers and proxies do: a redaction test's bait.
    ECHO_CREDENTIALS = "echo_credentials"


_FAULT_RATE_FIELDS: tuple[tuple[str, Fault], ...] = (
    ("fault_500_rate", Fault.HTTP_500),
    ("fault_503_rate", Fault.HTTP_503),
    ("fault_429_rate", Fault.RATE_LIMIT_429),
    ("fault_slow_rate", Fault.SLOW),
    ("fault_hang_rate", Fault.HANG),
    ("fault_drop_rate", Fault.DROP),
    ("fault_malformed_rate", Fault.MALFORMED_JSON),
    ("fault_no_usage_rate", Fault.MISSING_USAGE),
    ("fault_stream_break_rate", Fault.STREAM_BREAK),
)


def _opt(help_: str) -> Any:
    return {"help": help_}


@dataclass(frozen=True)
class MockServerConfig:
    """The server's behaviour. Invalid values raise ValueError naming the field."""

    latency_s: float = field(default=0.0, metadata=_opt("fixed latency of every answer"))
    latency_jitter_s: float = field(default=0.0, metadata=_opt("extra seeded uniform jitter"))
    latency_sigma: float = field(
        default=0.0, metadata=_opt("lognormal spread: latency_s x exp(sigma x z), seeded")
    )
    output_tokens_min: int = field(default=20, metadata=_opt("smallest planned output"))
    output_tokens_max: int = field(default=60, metadata=_opt("largest planned output"))
    rpm_limit: int | None = field(default=None, metadata=_opt("requests per minute"))
    tpm_limit: int | None = field(default=None, metadata=_opt("tokens per minute"))
    window_s: float = field(default=60.0, metadata=_opt("sliding window length, seconds"))
    token_quota: int | None = field(default=None, metadata=_opt("total tokens before 429 quota"))
    count_rate_limited: int = field(
        default=0, metadata=_opt("1: a rate-limit 429 still counts as a request in the window")
    )
    require_api_key: str | None = field(default=None, metadata=_opt("401 unless this bearer"))
    seed: int = field(default=0, metadata=_opt("seed of faults and jitter"))
    fault_500_rate: float = field(default=0.0, metadata=_opt("share of 500 answers"))
    fault_503_rate: float = field(default=0.0, metadata=_opt("share of 503 answers"))
    fault_429_rate: float = field(default=0.0, metadata=_opt("share of forced 429 answers"))
    fault_slow_rate: float = field(default=0.0, metadata=_opt("share answered after slow_s"))
    fault_hang_rate: float = field(default=0.0, metadata=_opt("share never answered"))
    fault_drop_rate: float = field(default=0.0, metadata=_opt("share of dropped connections"))
    fault_malformed_rate: float = field(default=0.0, metadata=_opt("share of invalid JSON"))
    fault_no_usage_rate: float = field(default=0.0, metadata=_opt("share without usage"))
    fault_stream_break_rate: float = field(
        default=0.0, metadata=_opt("share of streams cut mid-body")
    )
    fault_script: tuple[str, ...] = field(
        default=(),
        metadata=_opt("faults of the first arrivals, comma separated ('none' for no fault)"),
    )
    slow_s: float = field(default=120.0, metadata=_opt("delay of the slow fault"))
    fault_429_retry_after_s: float = field(default=0.1, metadata=_opt("retry-after of forced 429"))
    stream_chunks: int = field(default=4, metadata=_opt("text deltas per stream"))
    stream_interval_s: float = field(
        default=0.0, metadata=_opt("pause after each text delta of a stream")
    )
    log_max_records: int = field(default=1_000_000, metadata=_opt("older records are dropped"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fault_script":
                continue
            optional = value is None and "None" in str(f.type)
            if f.name == "require_api_key":
                ok = optional or (isinstance(value, str) and value != "")
                _check(f.name, ok, f"={value!r}: use a non-empty string, or None for no check")
            elif isinstance(value, bool):
                _check(f.name, False, f"={value!r}: expected a number, not a bool")
            elif str(f.type).startswith("int"):
                _check(f.name, optional or isinstance(value, int), f"={value!r}: expected an int")
            else:
                ok = isinstance(value, int | float) and math.isfinite(value)
                _check(f.name, ok, f"={value!r}: expected a finite number")
        _check("count_rate_limited", self.count_rate_limited in (0, 1), "must be 0 or 1")
        for name in (
            "latency_s",
            "latency_jitter_s",
            "latency_sigma",
            "slow_s",
            "fault_429_retry_after_s",
            "stream_interval_s",
        ):
            _check(name, getattr(self, name) >= 0, "must be >= 0")
        _check("output_tokens_min", self.output_tokens_min >= 1, "must be >= 1")
        _check(
            "output_tokens_max",
            self.output_tokens_max >= self.output_tokens_min,
            f"must be >= output_tokens_min ({self.output_tokens_min})",
        )
        _check("window_s", self.window_s > 0, "must be > 0")
        for name in ("rpm_limit", "tpm_limit"):
            limit = getattr(self, name)
            _check(
                name,
                limit is None or limit * self.window_s / 60 >= 1,
                f"with window_s={self.window_s} must allow at least one per window "
                "(limit * window_s / 60 >= 1); raise it or lengthen window_s",
            )
        _check("token_quota", self.token_quota is None or self.token_quota >= 0, "must be >= 0")
        _check("stream_chunks", self.stream_chunks >= 1, "must be >= 1")
        _check("log_max_records", self.log_max_records >= 1, "must be >= 1")
        for name, _ in _FAULT_RATE_FIELDS:
            _check(name, 0 <= getattr(self, name) <= 1, "must be within [0, 1]")
        total = sum(getattr(self, name) for name, _ in _FAULT_RATE_FIELDS)
        _check("fault_500_rate", total <= 1, f"the fault rates sum to {total}, more than 1")
        script = self.fault_script
        ok = not isinstance(script, str) and all(isinstance(item, str) for item in script)
        _check("fault_script", ok, f"={script!r}: expected a sequence of fault names")
        allowed = {f.value for f in Fault} | {"none", ""}
        for item in script:
            _check(
                "fault_script", item in allowed, f"unknown fault {item!r}; use {sorted(allowed)}"
            )
        object.__setattr__(self, "fault_script", tuple(script))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fault_script"] = list(self.fault_script)
        return data


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        separator = "" if problem.startswith("=") else " "
        raise ValueError(f"MockServerConfig.{name}{separator}{problem}")


@dataclass(slots=True)
class LogRecord:
    """One arrival at /v1/responses. ``status`` None means no HTTP answer was sent."""

    index: int
    arrival_monotonic: float
    arrival_wall: float
    request_id: str
    client_request_id: str | None
    authorization_present: bool
    model: str | None = None
    api: str = "responses"  # or "chat" (/v1/chat/completions)
    stream: bool = False
    status: int | None = None
    fault: str | None = None
    error_type: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    counted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------- rate window and prompt cache


def _ceil_ms(seconds: float) -> int:
    # The tolerance keeps float noise (1000.0 + 1 - 1000.9 = 0.10000000000002) from adding 1 ms.
    return max(math.ceil(seconds * 1000 - 1e-6), 0)


def format_duration(seconds: float) -> str:
    """OpenAI's header format: "20ms", "1s", "1.5s", "6m0s", "1h2m3s" (rounded up to a ms)."""
    ms = _ceil_ms(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _Window:
    """Counted arrivals ``(t, tokens)`` in arrival order; an entry leaves at ``t + window_s``."""

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def purge(self, now: float, window_s: float) -> None:
        entries = self.entries
        while entries and entries[0][0] + window_s <= now:
            self.tokens -= entries.popleft()[1]

    def wait_for(self, now: float, window_s: float, requests: int, tokens: int) -> float:
        """Seconds until ``requests`` more entries and ``tokens`` more tokens have left."""
        until = 0.0
        freed_tokens = 0
        for freed_requests, (t, cost) in enumerate(self.entries):
            if freed_requests >= requests and freed_tokens >= tokens:
                break
            freed_tokens += cost
            until = t + window_s - now
        return max(until, 0.0)


class _PrefixCache:
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def lookup_and_add(self, prompt: str) -> int:
        steps = len(prompt) // _CACHE_STEP_CHARS
        if math.ceil(len(prompt) / 4) < _CACHE_MIN_TOKENS or steps * 128 < _CACHE_MIN_TOKENS:
            return 0
        if len(self.seen) > _CACHE_MAX_ENTRIES:
            self.seen.clear()
        hasher = hashlib.sha1(usedforsecurity=False)
        cached = 0
        for k in range(1, steps + 1):
            hasher.update(prompt[(k - 1) * _CACHE_STEP_CHARS : k * _CACHE_STEP_CHARS].encode())
            if k * 128 < _CACHE_MIN_TOKENS:
                continue
            digest = hasher.copy().digest()
            if digest in self.seen:
                cached = k * 128
            else:
                self.seen.add(digest)
        return cached


def max_arrivals_in_window(arrival_times: Iterable[float], window_s: float) -> int:
    """The most arrivals in any half-open window ``[t, t + window_s)``.

    Also usable on the ``arrival_monotonic`` values of ``GET /_mock/log`` from a child process.
    """
    times = sorted(arrival_times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best

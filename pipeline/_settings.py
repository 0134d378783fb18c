"""The service's settings, grouped (:class:`Limits`, :class:`RetrySettings`,
:class:`StoreSettings`) and validated once.

Invariants:
- Every numeric setting is checked when its group is made, whether it came from a keyword
  argument, a settings object or an ``LLMTRAIL_*`` variable: the right type (a bool is not a
  number), finite, in its range. A bad one raises :class:`ConfigurationError` with one line that
  names the setting (and the variable it came from) and the accepted range. Nothing downstream
  (gates, semaphore, retry policy) ever sees a NaN, a negative wait or a zero capacity.
- The environment is read once, by :func:`limits_from_environment`: ``LLMTRAIL_MAX_RPM``,
  ``LLMTRAIL_MAX_TPM``, ``LLMTRAIL_MAX_CONCURRENT``. An empty variable is unset; anything that
  does not parse is an error, never ignored; ``0`` is out of range, never "the default".
- Groups are frozen; :func:`merge` combines a group passed as an object with the keywords of
  the same fields, refusing a field given both ways with different values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, TypeVar

from ._errors import ConfigurationError
from ._gates import DEFAULT_ARRIVAL_GUARD_S

__all__ = [
    "env_bool",
    "env_capture",
    "ENVIRONMENT",
    "Limits",
    "RetrySettings",
    "StoreSettings",
    "check_number",
    "limits_from_environment",
    "merge",
]

# Setting -> the variable that provides it when no argument does.
ENVIRONMENT: Final = {
    "max_rpm": "LLMTRAIL_MAX_RPM",
    "max_tpm": "LLMTRAIL_MAX_TPM",
    "max_concurrent_requests": "LLMTRAIL_MAX_CONCURRENT",
}
_DAY_S: Final = 86_400.0


def _describe(integer: bool, low: float, high: float | None, low_open: bool, none: bool) -> str:
    kind = "an int" if integer else "a finite number"
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    text = f"{kind} {bound}" + (f" and <= {high:g}" if high is not None else "")
    return text + (", or None" if none else "")


def check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    low: float = 0.0,
    high: float | None = None,
    low_open: bool = False,
    none: bool = False,
    source: str | None = None,
) -> Any:
    """``value`` if it is a number in range (``None`` too when ``none``), else a one-line
    :class:`ConfigurationError` naming ``name`` (and ``source``) and the accepted range."""
    if value is None and none:
        return None
    accepted = _describe(integer, low, high, low_open, none)
    where = f"{source}={value!r} (for {name})" if source else f"{name}={value!r}"
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok and integer and not isinstance(value, int):
        ok = False
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(number) and (number > low if low_open else number >= low)
        ok = ok and (high is None or number <= high)
    if not ok:
        raise ConfigurationError(f"{where} is invalid: use {accepted}")
    return value


def _env_number(name: str, environ: Mapping[str, str], **rules: Any) -> Any:
    variable = ENVIRONMENT[name]
    raw = environ.get(variable, "").strip()
    if raw == "":
        return None
    try:
        value: float = int(raw) if rules.get("integer") else float(raw)
    except ValueError:
        accepted = _describe(
            rules.get("integer", False),
            rules.get("low", 0.0),
            rules.get("high"),
            rules.get("low_open", False),
            False,
        )
        raise ConfigurationError(
            f"{variable}={raw!r} (for {name}) is not a number: use {accepted}, or unset it"
        ) from None
    return check_number(name, value, source=variable, **rules)


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Limits:
    """What the service lets through: the provider's budget and how much runs at once.

    ``max_rpm``/``max_tpm`` None means no gate; ``rpm_window_seconds`` is the gates' window;
    ``send_guard_s`` caps how long an unanswered attempt keeps its slot (None: until it ends);
    ``unanswered_guard_s`` how long a slot outlives an attempt that ended without an answer;
    ``arrival_guard_s`` the bound on network delay from the written request body to the
    provider (a slot's window starts at most that long after the body was written).
    """

    max_rpm: int | None = None
    max_tpm: int | None = None
    max_concurrent_requests: int = 100
    rpm_window_seconds: float = 60.0
    default_max_output_tokens: int = 1024
    send_guard_s: float | None = None
    unanswered_guard_s: float = 1.0
    arrival_guard_s: float = DEFAULT_ARRIVAL_GUARD_S

    def __post_init__(self) -> None:
        check_number("max_rpm", self.max_rpm, integer=True, low=1, none=True)
        check_number("max_tpm", self.max_tpm, integer=True, low=1, none=True)
        check_number(
            "max_concurrent_requests",
            self.max_concurrent_requests,
            integer=True,
            low=1,
            high=100_000,
        )
        check_number("rpm_window_seconds", self.rpm_window_seconds, low_open=True, high=_DAY_S)
        check_number(
            "default_max_output_tokens", self.default_max_output_tokens, integer=True, low=1
        )
        check_number("send_guard_s", self.send_guard_s, high=_DAY_S, none=True)
        check_number("unanswered_guard_s", self.unanswered_guard_s, high=_DAY_S)
        check_number("arrival_guard_s", self.arrival_guard_s, high=_DAY_S)


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How a failed attempt is retried: ``max_attempts`` HTTP attempts in all, exponential
    backoff from ``retry_backoff_base_s`` up to ``retry_backoff_max_s``, a provider's
    retry-after honoured up to ``max_retry_wait_s``; each attempt times out after
    ``request_timeout_s``."""

    max_attempts: int = 3
    request_timeout_s: float = 60.0
    retry_backoff_base_s: float = 0.5
    retry_backoff_max_s: float = 20.0
    max_retry_wait_s: float = 60.0

    def __post_init__(self) -> None:
        check_number("max_attempts", self.max_attempts, integer=True, low=1, high=100)
        check_number("request_timeout_s", self.request_timeout_s, low_open=True, high=_DAY_S)
        check_number("retry_backoff_base_s", self.retry_backoff_base_s, high=_DAY_S)
        check_number(
            "retry_backoff_max_s",
            self.retry_backoff_max_s,
            low=float(self.retry_backoff_base_s),
            high=_DAY_S,
        )
        check_number("max_retry_wait_s", self.max_retry_wait_s, high=_DAY_S)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where events are persisted (``store_url`` None: nowhere), how many may wait for the
    writer before callers are held back (``max_event_queue``), whether a call waits for its
    events to be committed (``durability``: "write_ahead" or "async") and for how long at most
    (``store_timeout_s``)."""

    store_url: str | None = None
    max_event_queue: int = 10_000
    durability: str = "write_ahead"
    store_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.store_url is not None and not isinstance(self.store_url, str):
            raise ConfigurationError(
                f"store_url={self.store_url!r} is invalid: use a URL string, or None"
            )
        check_number("max_event_queue", self.max_event_queue, integer=True, low=1)
        if self.durability not in ("write_ahead", "async"):
            raise ConfigurationError(
                f"durability={self.durability!r} is invalid: use 'write_ahead' (the default: "
                "nothing is sent or returned before it is logged) or 'async' (events are only "
                "queued)"
            )
        check_number("store_timeout_s", self.store_timeout_s, low=0.0, low_open=True)


def limits_from_environment(
    given: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> dict[str, object]:
    """``given`` with each setting of :data:`ENVIRONMENT` that is absent from it read from
    its variable (validated there, so the error names the variable)."""
    environ = os.environ if environ is None else environ
    out = dict(given)
    for name in ENVIRONMENT:
        if name in out:
            continue
        value = _env_number(name, environ, integer=True, low=1)
        if value is not None:
            out[name] = value
    return out


def merge(cls: type[_T], group: _T | None, keywords: Mapping[str, object]) -> _T:
    """A ``cls`` from ``group`` (a settings object, or None) and the keywords of its fields
    that differ from the field defaults; a field set both ways, differently, is an error."""
    defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
    chosen = {k: v for k, v in keywords.items() if k in defaults and v != defaults[k]}
    if group is None:
        return cls(**{k: v for k, v in keywords.items() if k in defaults})
    for name, value in chosen.items():
        if getattr(group, name) != value:
            raise ConfigurationError(
                f"{name} is given twice ({name}={value!r} and in {cls.__name__} as "
                f"{getattr(group, name)!r}): pass it one way"
            )
    return replace(group, **chosen)  # type: ignore[type-var]


def env_bool(name: str) -> bool:
    """A boolean environment variable: 1/0, true/false, yes/no, on/off; unset is False."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{name}={raw!r} is not a boolean: use 1 or 0, or unset it")


_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def env_capture() -> bool:
    """The standard GenAI content-capture switch: ``true``/``false``, or the newer
    ``SPAN_ONLY``/``SPAN_AND_EVENT`` (on) and ``NO_CONTENT``/``EVENT_ONLY`` (off for spans)."""
    raw = os.environ.get(_CAPTURE_ENV, "").strip().lower()
    if raw in ("", "false", "no_content", "event_only"):
        return False
    if raw in ("true", "span_only", "span_and_event"):
        return True
    raise ConfigurationError(
        f"{_CAPTURE_ENV}={raw!r} is invalid: use true or false (or SPAN_ONLY, SPAN_AND_EVENT, "
        "NO_CONTENT, EVENT_ONLY), or unset it"
    )

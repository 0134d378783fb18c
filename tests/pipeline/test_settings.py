"""Settings: every number validated once, one line naming it and the accepted range; groups."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llmtrail.pipeline import (
    BaseLLMService,
    ConfigurationError,
    Limits,
    RetrySettings,
    StoreSettings,
)

BASE: dict[str, Any] = {"api_key": "sk-test-settings", "store_url": None, "tracing": False}

# (setting, a bad value, words the message must hold)
BAD = [
    ("send_guard_s", math.nan, ">= 0"),
    ("send_guard_s", -1.0, ">= 0"),
    ("send_guard_s", math.inf, ">= 0"),
    ("unanswered_guard_s", -0.5, ">= 0"),
    ("unanswered_guard_s", math.nan, ">= 0"),
    ("max_rpm", 0, "int >= 1"),
    ("max_rpm", -5, "int >= 1"),
    ("max_rpm", 2.5, "int >= 1"),
    ("max_rpm", "abc", "int >= 1"),
    ("max_rpm", True, "int >= 1"),
    ("max_tpm", 0, "int >= 1"),
    ("max_concurrent_requests", 0, "int >= 1"),
    ("max_concurrent_requests", -1, "int >= 1"),
    ("max_concurrent_requests", math.nan, "int >= 1"),
    ("rpm_window_seconds", 0, "> 0"),
    ("rpm_window_seconds", math.nan, "> 0"),
    ("rpm_window_seconds", -60.0, "> 0"),
    ("request_timeout_s", 0, "> 0"),
    ("request_timeout_s", math.inf, "> 0"),
    ("max_attempts", 0, "int >= 1"),
    ("max_attempts", 1.5, "int >= 1"),
    ("default_max_output_tokens", 0, "int >= 1"),
    ("retry_backoff_base_s", -1.0, ">= 0"),
    ("retry_backoff_base_s", math.nan, ">= 0"),
    ("retry_backoff_max_s", math.nan, ">= 0.5"),
    ("retry_backoff_max_s", 0.1, ">= 0.5"),
    ("max_retry_wait_s", -1.0, ">= 0"),
    ("max_event_queue", 0, "int >= 1"),
    ("rate_limit_replicas", 0, "int >= 1"),
]


@pytest.mark.parametrize(("name", "value", "accepted"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_number_is_refused_with_one_line_naming_it_and_the_range(
    name: str, value: object, accepted: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BaseLLMService(**BASE, **{name: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is invalid: use ")
    assert accepted in message, message


ENV_BAD = [
    ("LLMTRAIL_MAX_RPM", "abc", "not a number"),
    ("LLMTRAIL_MAX_RPM", "0", "is invalid"),
    ("LLMTRAIL_MAX_RPM", "-5", "is invalid"),
    ("LLMTRAIL_MAX_RPM", "1.5", "not a number"),
    ("LLMTRAIL_MAX_TPM", "nan", "not a number"),
    ("LLMTRAIL_MAX_CONCURRENT", "0", "is invalid"),
    ("LLMTRAIL_MAX_CONCURRENT", "lots", "not a number"),
]


@pytest.mark.parametrize(("variable", "raw", "problem"), ENV_BAD)
def test_a_bad_variable_is_refused_naming_the_variable_never_ignored(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, problem: str
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigurationError) as caught:
        BaseLLMService(**BASE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(variable) and problem in message and "int >= 1" in message


def test_variables_fill_what_the_arguments_leave_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTRAIL_MAX_RPM", "120")
    monkeypatch.setenv("LLMTRAIL_MAX_CONCURRENT", "7")
    monkeypatch.setenv("LLMTRAIL_MAX_TPM", "")  # empty means unset
    service = BaseLLMService(**BASE, max_tpm=5_000)
    assert service.limits == Limits(max_rpm=120, max_tpm=5_000, max_concurrent_requests=7)
    assert service.max_concurrent_requests == 7
    rpm, tpm = service.gates
    assert rpm is not None and tpm is not None
    explicit = BaseLLMService(**BASE, max_rpm=None, max_concurrent_requests=3)
    assert explicit.max_rpm is None and explicit.limits.max_concurrent_requests == 3


def test_groups_can_be_passed_as_objects_and_keywords_still_work() -> None:
    limits = Limits(max_rpm=60, max_concurrent_requests=4, send_guard_s=0.0)
    retry = RetrySettings(max_attempts=5, retry_backoff_base_s=0.0)
    service = BaseLLMService(
        api_key="sk-test-settings",
        tracing=False,
        limits=limits,
        retry=retry,
        store=StoreSettings(store_url=None, max_event_queue=50),
    )
    assert service.limits == limits and service.max_rpm == 60
    assert service.retry_settings == retry
    assert service.store_settings.max_event_queue == 50 and service.store_url is None
    by_keywords = BaseLLMService(**BASE, max_rpm=60, max_concurrent_requests=4, send_guard_s=0.0)
    assert by_keywords.limits == limits
    # The same value both ways is fine; different values are refused.
    BaseLLMService(**BASE, limits=limits, max_rpm=60)
    with pytest.raises(ConfigurationError, match=r"max_rpm is given twice"):
        BaseLLMService(**BASE, limits=limits, max_rpm=30)


def test_a_settings_object_validates_itself() -> None:
    with pytest.raises(ConfigurationError, match=r"^send_guard_s=nan is invalid"):
        Limits(send_guard_s=math.nan)
    with pytest.raises(ConfigurationError, match=r"^max_attempts=0 is invalid"):
        RetrySettings(max_attempts=0)
    with pytest.raises(ConfigurationError, match=r"^store_url=5 is invalid"):
        StoreSettings(store_url=5)  # type: ignore[arg-type]

"""Masking of API keys and Authorization headers (telemetry._redact)."""

from __future__ import annotations

import httpx2
import pytest

from llmtrail.telemetry import redact_text, redact_value

KEY = "sk-proj-Abc123_def456-ghi789"


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}.",
        "session sess-AbCdEfGhIjKl was rejected",
        "Authorization: Bearer abc.def.ghi",
        "{'authorization': 'Basic dXNlcjpwYXNz'}",
        '"Authorization": "Bearer xyz"',
        "api-key=hunter2hunter2",
        "headers=Headers({'x-api-key': 'plainsecret'})",
        "bearer TOKEN123",
    ],
)
def test_secrets_in_free_text_are_masked(text: str) -> None:
    masked = redact_text(text)
    assert "[REDACTED]" in masked
    for secret in (
        KEY,
        "sess-AbCdEfGhIjKl",
        "abc.def.ghi",
        "dXNlcjpwYXNz",
        "xyz",
        "hunter2",
        "plainsecret",
        "TOKEN123",
    ):
        assert secret not in masked


@pytest.mark.parametrize(
    "text",
    [
        "retrying attempt=2 error_type=rate_limited wait_s=0.5",
        "input_tokens=12 output_tokens=9 total_tokens=21",
        "task-queue drained; risk-free",
        "monkey business",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_sensitive_keys_are_masked_whatever_their_value_and_nesting() -> None:
    value = {
        "Authorization": "opaque-token",
        "nested": [{"api_key": 12345}, ("ok", f"key {KEY}")],
        "http.request.header.authorization": ["Bearer x"],
        "input_tokens": 12,
        "tokens": {"output_tokens": 9},
    }
    masked = redact_value(value)
    assert masked["Authorization"] == "[REDACTED]"
    assert masked["nested"][0]["api_key"] == "[REDACTED]"
    assert masked["nested"][1] == ("ok", "key sk-[REDACTED]")
    assert masked["http.request.header.authorization"] == "[REDACTED]"
    assert masked["input_tokens"] == 12 and masked["tokens"] == {"output_tokens": 9}
    assert value["Authorization"] == "opaque-token", "the input is not mutated"


def test_header_mappings_are_masked_too() -> None:
    headers = httpx2.Headers({"Authorization": f"Bearer {KEY}", "Accept": "*/*"})
    masked = redact_value(headers)
    assert masked == {"authorization": "[REDACTED]", "accept": "*/*"}


def test_redaction_is_idempotent() -> None:
    text = f"Authorization: Bearer {KEY} and bearer abc and api-key=zzz"
    once = redact_text(text)
    assert redact_text(once) == once
    assert "]]" not in once

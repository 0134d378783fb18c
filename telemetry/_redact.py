"""Masking of API keys and Authorization headers, shared by the log processors and the spans.

Invariants:
- :func:`redact_text` masks, anywhere in a string, OpenAI-style keys (``sk-...``,
  ``sess-...``), ``Bearer``/``Basic`` credentials and the value of an ``Authorization`` or
  ``api-key`` header written as ``name: value`` or ``name=value``.
- :func:`redact_value` does the same through dicts (and any ``Mapping``, such as httpx
  headers), lists, tuples and sets, and masks the whole value of a sensitive *key* such as
  ``authorization`` or ``api_key``, whatever the value looks like.
- Redaction never raises and never mutates its input; it returns a new value when something
  was masked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MASK", "is_sensitive_key", "redact_text", "redact_value"]

MASK: Final = "[REDACTED]"

# Keys whose value is a secret whatever it looks like. Compared after lower-casing and
# mapping "-" to "_", and on the last dotted component too, so "http.request.header.authorization"
# (the OTel header attribute form) matches.
_SENSITIVE_KEYS: Final = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "api_key",
        "apikey",
        "x_api_key",
        "openai_api_key",
        "password",
        "secret",
        "client_secret",
        "access_token",
        "refresh_token",
    }
)

# The lookahead keeps redaction idempotent: the log formatter masks the rendered line again.
_HEADER_VALUE = r"(?!\[REDACTED\])(?:(?:bearer|basic|token)\s+)?(?!\[REDACTED\])[^\s\"',;}\]]+"
_PATTERNS: Final = (
    # "Authorization: Bearer x", "'authorization': 'Basic y'", "api-key=z".
    re.compile(
        r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key)([\"']?\s*[:=]\s*[\"']?)"
        + _HEADER_VALUE
    ),
    re.compile(r"(?i)\b(bearer)(\s+)(?!\[REDACTED\])[^\s\"',;}\]]+"),
    # OpenAI secret keys (sk-..., sk-proj-...) and session keys (sess-...).
    re.compile(r"\b(sk|sess)(-)[A-Za-z0-9_\-]{3,}"),
)


def is_sensitive_key(key: str) -> bool:
    normalized = key.lower().replace("-", "_")
    return normalized in _SENSITIVE_KEYS or normalized.rsplit(".", 1)[-1] in _SENSITIVE_KEYS


def redact_text(text: str) -> str:
    # Cheap pre-check: most log lines and messages contain none of the trigger words.
    lowered = text.lower()
    if not any(marker in lowered for marker in ("sk-", "sess-", "bearer", "authorization", "key")):
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return text


def redact_value(value: Any) -> Any:
    """``value`` with every secret masked; containers are copied, other objects kept as they are."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            key: (MASK if isinstance(key, str) and is_sensitive_key(key) else redact_value(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_value(item) for item in value]
    if isinstance(value, tuple):
        return tuple(redact_value(item) for item in value)
    if isinstance(value, set | frozenset):
        return {redact_value(item) for item in value}
    return value

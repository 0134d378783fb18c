"""The one redaction pass: secrets are masked before text reaches an event, a log line or a span.

Applied at the event boundary (the call flow masks provider error text before it enters
``attempt_failed`` / ``completed`` and the result), by the log processors and the log formatter,
and to span attributes and captured HTTP headers (``llmtrail.telemetry`` imports it from here).

Invariants:
- :func:`redact_text` masks, anywhere in a string: API keys of the known shapes (OpenAI
  ``sk-...``/``sess-...``, Anthropic ``sk-ant-...``, Google ``AIza...``, AWS ``AKIA...``, GitHub
  ``ghp_...``, Slack ``xox.-...``, Hugging Face ``hf_...``, JWTs), ``Bearer`` credentials, the
  value of an ``Authorization``, ``api-key`` or ``*token``/``*secret``/``*password`` header or
  field written as ``name: value`` or ``name=value``, the password of a URL
  (``scheme://user:secret@host``, up to the last ``@`` of the authority, so an unencoded ``@``
  in it is masked too), and every secret given to :func:`register_secret` (the configured API
  key itself, whatever its shape).
- :func:`redact_value` does the same through dicts (and any ``Mapping``, such as httpx
  headers), lists, tuples and sets, and masks the whole value of a sensitive *key*: one whose
  name has a part such as ``authorization``, ``token``, ``secret``, ``password``, ``cookie``,
  ``credential`` or ``api_key`` (``x-custom-token`` is, ``input_tokens`` is not).
- Redaction never raises, never mutates its input and is idempotent.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "MASK",
    "is_sensitive_key",
    "mask_url_password",
    "redact_text",
    "redact_value",
    "register_secret",
]

MASK: Final = "[REDACTED]"
_MIN_SECRET = 8  # shorter "secrets" (test keys like "x") would mask ordinary words

# Parts of a key name (split on "_", "-" and ".") that make its value a secret.
_SENSITIVE_PARTS: Final = frozenset(
    {
        "apikey",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "passwd",
        "password",
        "secret",
        "signature",
        "token",
    }
)
_SENSITIVE_PAIRS: Final = ("api_key", "private_key", "access_key", "session_key")

# The lookaheads keep redaction idempotent: the log formatter masks the rendered line again.
_HEADER_VALUE = r"(?!\[REDACTED\])(?:(?:bearer|basic|token)\s+)?(?!\[REDACTED\])[^\s\"',;}\]]+"
_PATTERNS: Final = (
    # "Authorization: Bearer x", "'authorization': 'Basic y'", "api-key=z".
    re.compile(
        r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key"
        r"|[a-z0-9_\-]*(?:token|secret|password|passwd))([\"']?\s*[:=]\s*[\"']?)" + _HEADER_VALUE
    ),
    re.compile(r"(?i)\b(bearer)(\s+)(?!\[REDACTED\])[^\s\"',;}\]]+"),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-) secret keys and session keys (sess-).
    re.compile(r"\b(sk|sess)(-)[A-Za-z0-9_\-]{3,}"),
    # Google, AWS, GitHub, Slack, Hugging Face keys; JWTs.
    re.compile(r"\b(AIza)()[0-9A-Za-z_\-]{30,}"),
    re.compile(r"\b(A[KS]IA)()[0-9A-Z]{16}\b"),
    re.compile(r"\b(gh[pousr]_|github_pat_)()[A-Za-z0-9_]{20,}"),
    re.compile(r"\b(xox[abprs]-)()[A-Za-z0-9\-]{10,}"),
    re.compile(r"\b(hf_)()[A-Za-z0-9]{30,}"),
    re.compile(r"\b(eyJ)()[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    # A URL's password: scheme://user:secret@host, up to the authority's last "@".
    re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/@\s\"']*)(:)(?!\[REDACTED\]@)[^/\s\"']*@"),
)
_URL_PASSWORD: Final = _PATTERNS[-1]
_MARKERS: Final = (
    "token",
    "secret",
    "passw",
    "sk-",
    "sess-",
    "bearer",
    "authorization",
    "key",
    "aiza",
    "akia",
    "asia",
    "gh",
    "xox",
    "hf_",
    "eyj",
    "://",
)

_secrets: frozenset[str] = frozenset()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears from now on (the configured API key, for one).

    Values shorter than 8 characters are ignored: they would mask ordinary words.
    """
    global _secrets
    if not value or len(value) < _MIN_SECRET:
        return
    with _secrets_lock:
        _secrets = _secrets | {value}


def is_sensitive_key(key: str) -> bool:
    normalized = key.lower().replace("-", "_")
    last = normalized.rsplit(".", 1)[-1]
    if any(pair in last for pair in _SENSITIVE_PAIRS):
        return True
    return not _SENSITIVE_PARTS.isdisjoint(last.split("_"))


def _mask(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2)}{MASK}" + ("@" if match.re is _URL_PASSWORD else "")


def redact_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    # Cheap pre-check: most log lines and messages contain none of the trigger words.
    lowered = text.lower()
    if not any(marker in lowered for marker in _MARKERS):
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def mask_url_password(url: str, mask: str = "***") -> str:
    """``url`` with its password (up to the authority's last ``@``) replaced by ``mask``."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{mask}@", url)


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

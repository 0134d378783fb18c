"""Redaction lives in :mod:`llmtrail.pipeline._redact`: one pass, shared with the call flow."""

from __future__ import annotations

from llmtrail.pipeline._redact import MASK, is_sensitive_key, redact_text, redact_value

__all__ = ["MASK", "is_sensitive_key", "redact_text", "redact_value"]

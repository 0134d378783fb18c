"""Request and result types of the public API.

A :class:`GenerationRequest` is validated when it is built: an invalid value raises
``ValueError`` naming the field and the fix, so a bad request never reaches a gate.
A :class:`GenerationResult` is always returned, success or not; ``usage.cost_usd`` is an exact
``Decimal``, or ``None`` when the model has no known price (never a silent $0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ._errors import ErrorType

__all__ = ["GenerationRequest", "GenerationResult", "Timings", "Usage", "coerce_request"]

_ROLES = frozenset({"system", "developer", "user", "assistant"})
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


def _is_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (it could never be sent as UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad(field_name: str, value: object, fix: str) -> ValueError:
    return ValueError(f"GenerationRequest.{field_name}={value!r} is invalid: {fix}")


@dataclass(slots=True, frozen=True)
class GenerationRequest:
    """One LLM call. Give ``user_prompt`` or ``input`` (a list of role/content messages)."""

    user_prompt: str | None = None
    system_prompt: str | None = None
    input: Sequence[Mapping[str, str]] | None = None
    model: str | None = None
    operation_name: str | None = None
    request_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    reasoning_effort: str | None = None
    response_schema: type[Any] | None = None
    previous_response_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    store: bool = False

    def __post_init__(self) -> None:
        if self.user_prompt is None and not self.input:
            raise ValueError(
                "GenerationRequest has no prompt: set user_prompt='...' or "
                "input=[{'role': 'user', 'content': '...'}]"
            )
        if self.user_prompt is not None and self.input:
            raise _bad("input", "...", "give either user_prompt or input, not both")
        if self.user_prompt is not None and not isinstance(self.user_prompt, str):
            raise _bad("user_prompt", self.user_prompt, "it must be a str")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise _bad("system_prompt", self.system_prompt, "it must be a str")
        if self.input:
            for i, message in enumerate(self.input):
                if not isinstance(message, Mapping) or "content" not in message:
                    raise _bad(f"input[{i}]", message, "each message is a {role, content} dict")
                if message.get("role", "user") not in _ROLES:
                    raise _bad(
                        f"input[{i}].role", message.get("role"), f"use one of {sorted(_ROLES)}"
                    )
                if not isinstance(message["content"], str):
                    raise _bad(f"input[{i}].content", message["content"], "it must be a str")
        if self.max_output_tokens is not None and (
            isinstance(self.max_output_tokens, bool)
            or not isinstance(self.max_output_tokens, int)
            or self.max_output_tokens < 1
        ):
            raise _bad("max_output_tokens", self.max_output_tokens, "use an int >= 1, or None")
        if self.temperature is not None and (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or not 0 <= self.temperature <= 2
        ):
            raise _bad("temperature", self.temperature, "use a number in [0, 2], or None")
        if self.reasoning_effort is not None and self.reasoning_effort not in _EFFORTS:
            raise _bad("reasoning_effort", self.reasoning_effort, f"use one of {sorted(_EFFORTS)}")
        if self.response_schema is not None and not (
            isinstance(self.response_schema, type)
            and hasattr(self.response_schema, "model_json_schema")
        ):
            raise _bad(
                "response_schema", self.response_schema, "pass a pydantic BaseModel subclass"
            )
        if not isinstance(self.metadata, Mapping):
            raise _bad("metadata", self.metadata, "use a dict of str -> str")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise _bad(f"metadata[{key!r}]", value, "metadata keys and values must be str")
        texts: list[tuple[str, str | None]] = [
            ("user_prompt", self.user_prompt),
            ("system_prompt", self.system_prompt),
        ]
        texts += [(f"input[{i}].content", m["content"]) for i, m in enumerate(self.input or ())]
        texts += [(f"metadata[{k!r}]", v) for k, v in self.metadata.items()]
        for name, text in texts:
            if text is not None and not _is_unicode(text):
                raise _bad(
                    name,
                    text[:40],
                    "it holds a lone surrogate, which is not valid Unicode and "
                    "cannot be sent as UTF-8; decode your input with errors='replace'",
                )
        for name in ("model", "operation_name", "request_id", "previous_response_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(name, value, "use a non-empty str, or None")

    def messages(self) -> list[dict[str, str]]:
        """The conversation as role/content messages, system prompt first."""
        out: list[dict[str, str]] = []
        if self.system_prompt:
            out.append({"role": "system", "content": self.system_prompt})
        if self.input:
            out.extend({"role": m.get("role", "user"), "content": m["content"]} for m in self.input)
        elif self.user_prompt is not None:
            out.append({"role": "user", "content": self.user_prompt})
        return out

    def prompt_chars(self) -> int:
        total = len(self.system_prompt or "")
        if self.input:
            total += sum(len(m["content"]) for m in self.input)
        else:
            total += len(self.user_prompt or "")
        return total


@dataclass(slots=True)
class Usage:
    """Token counts as the provider reports them.

    ``cached_tokens`` is part of ``input_tokens`` and ``reasoning_tokens`` part of
    ``output_tokens`` (the Responses API's convention).
    """

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class Timings:
    """Where the call's time went, in seconds."""

    rpm_wait_s: float = 0.0
    tpm_wait_s: float = 0.0
    semaphore_wait_s: float = 0.0
    latency_s: float = 0.0  # the last HTTP attempt
    total_s: float = 0.0


@dataclass(slots=True)
class GenerationResult:
    success: bool
    call_id: str
    trace_id: str
    operation_name: str
    model: str
    request_id: str | None = None
    content: Any = None
    raw_content: str | None = None
    response_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    error_type: ErrorType | None = None
    error_message: str | None = None
    attempts: int = 0
    timings: Timings = field(default_factory=Timings)
    rpm_at_start: int = 0
    tpm_at_start: int = 0


def coerce_request(request: object) -> GenerationRequest:
    """A GenerationRequest from what a caller passed (a request, a dict of its fields or a
    prompt string); anything else raises TypeError naming the fix."""
    if isinstance(request, GenerationRequest):
        return request
    if isinstance(request, Mapping):
        return GenerationRequest(**request)
    if isinstance(request, str):
        return GenerationRequest(user_prompt=request)
    return _reject(request)


def _reject(request: object) -> GenerationRequest:
    raise TypeError(
        f"execute_generation got a {type(request).__name__}; pass a GenerationRequest, e.g. "
        "GenerationRequest(user_prompt='...')"
    )

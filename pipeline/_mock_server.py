"""A local OpenAI-compatible server for tests, the demo and benchmarks (``llmtrail mock-server``).

It serves ``POST /v1/responses`` (JSON and SSE) with aiohttp, plus control endpoints under
``/_mock/`` (``GET /_mock/log``, ``POST /_mock/reset``, ``GET``/``POST /_mock/config``).

Invariants:
- Given the config, the seed and the order of arrivals, everything is deterministic: usage, the
  output text, and the fault and latency jitter drawn for the n-th arrival.
- One arrival decides auth, validation, quota, rate window and fault with no ``await`` in
  between, so two concurrent arrivals can never both take the last slot of a window.
- Every arrival at ``/v1/responses`` gets exactly one log record; its ``status`` is set when an
  HTTP answer is actually sent (``None``: dropped, hung, or the client left before the answer).
- Every HTTP answer carries ``x-request-id`` and the six ``x-ratelimit-*`` headers.

Usage model (documented so that tests can predict it):
- ``input_tokens = ceil(chars / 4)`` over ``instructions`` plus the text of every input message.
- The planned output is ``output_tokens_min..output_tokens_max`` tokens, picked by a sha256 of
  the prompt. With ``reasoning.effort``, a share of it is reasoning (``_REASONING_SHARE``); the
  rest is visible text of 4 characters per token. A ``json_schema`` format replaces the text by a
  minimal valid instance of the schema, and its visible tokens are ``ceil(len(json) / 4)``.
- ``max_output_tokens`` caps reasoning + visible tokens: the answer is then ``incomplete`` with
  reason ``max_output_tokens`` and the text is cut to 4 characters per remaining token.
- Prompt cache: the prompt text is cut into 128-token (512-character) prefixes from 1024 tokens
  on. ``cached_tokens`` is 128 x the longest such prefix an earlier counted request already
  sent (so an exact repeat of a >= 1024-token prompt gets the largest multiple of 128 <= input).
  ``cache_write_tokens`` is always 0: implicit caching writes are free and reported as 0.

Rate limits: requests and tokens are counted in one sliding window of ``window_s`` seconds whose
capacity is ``limit * window_s / 60``. A request is counted when it arrives, charged
``input_tokens + (max_output_tokens or its real output)``, and stays until ``arrival + window_s``.
Requests answered 429 (by the limits, the quota or the forced-429 fault), 400 or 401 are not
counted; every other answer, faults included, is (the provider saw the request). Limits are
global, not per model. ``remaining`` headers are what is left in the current window; ``reset``
headers are the time until the window is empty again. ``retry-after-ms`` on a 429 is the time
until enough of the window has left for that request to fit. ``token_quota`` is a total over the
server's life (until reset): once the tokens served reach it, every request gets 429
``insufficient_quota``; the request that crosses it is still served.

Faults: each arrival draws its fault and its jitter from ``Random(seed)`` (whatever then happens
to it); the first ``len(fault_script)`` arrivals take their fault from the script. A fault applies
only to a request that passed auth, validation, quota and the rate window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import select
import signal
import subprocess
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self, Union, get_args, get_origin, get_type_hints

from aiohttp import web

__all__ = [
    "Fault",
    "LogRecord",
    "MockServer",
    "MockServerConfig",
    "add_arguments",
    "format_duration",
    "max_arrivals_in_window",
    "run_from_args",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
    "serve",
]

UNLIMITED = 1_000_000_000  # the limit reported in headers when no limit is configured
ORGANIZATION = "org-mock"
_RATE_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
# The share of the planned output that is reasoning, per reasoning.effort.
_REASONING_SHARE = {
    "none": 0.0,
    "minimal": 0.125,
    "low": 0.25,
    "medium": 0.5,
    "high": 0.75,
    "xhigh": 0.875,
}
_CACHE_MIN_TOKENS = 1024
_CACHE_STEP_CHARS = 128 * 4
_CACHE_MAX_ENTRIES = 200_000  # the prefix set is cleared when it grows past this
_MIN_MAX_OUTPUT_TOKENS = 16  # the real API rejects smaller values


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


_FAULT_RATE_FIELDS: tuple[tuple[str, Fault], ...] = (
    ("fault_500_rate", Fault.HTTP_500),
    ("fault_503_rate", Fault.HTTP_503),
    ("fault_429_rate", Fault.RATE_LIMIT_429),
    ("fault_slow_rate", Fault.SLOW),
    ("fault_hang_rate", Fault.HANG),
    ("fault_drop_rate", Fault.DROP),
    ("fault_malformed_rate", Fault.MALFORMED_JSON),
    ("fault_no_usage_rate", Fault.MISSING_USAGE),
)


def _opt(help_: str) -> Any:
    return {"help": help_}


@dataclass(frozen=True)
class MockServerConfig:
    """The server's behaviour. Invalid values raise ValueError naming the field."""

    latency_s: float = field(default=0.0, metadata=_opt("fixed latency of every answer"))
    latency_jitter_s: float = field(default=0.0, metadata=_opt("extra seeded uniform jitter"))
    output_tokens_min: int = field(default=20, metadata=_opt("smallest planned output"))
    output_tokens_max: int = field(default=60, metadata=_opt("largest planned output"))
    rpm_limit: int | None = field(default=None, metadata=_opt("requests per minute"))
    tpm_limit: int | None = field(default=None, metadata=_opt("tokens per minute"))
    window_s: float = field(default=60.0, metadata=_opt("sliding window length, seconds"))
    token_quota: int | None = field(default=None, metadata=_opt("total tokens before 429 quota"))
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
    fault_script: tuple[str, ...] = field(
        default=(),
        metadata=_opt("faults of the first arrivals, comma separated ('none' for no fault)"),
    )
    slow_s: float = field(default=120.0, metadata=_opt("delay of the slow fault"))
    fault_429_retry_after_s: float = field(default=0.1, metadata=_opt("retry-after of forced 429"))
    stream_chunks: int = field(default=4, metadata=_opt("output_text.delta events per stream"))
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
        for name in ("latency_s", "latency_jitter_s", "slow_s", "fault_429_retry_after_s"):
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


# ---------------------------------------------------------------- the usage model


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(slots=True)
class _Plan:
    """What one request will produce, before the server's state (cache, window) is consulted."""

    model: str
    prompt: str
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    text: str
    incomplete: bool
    stream: bool
    charge: int  # tokens taken from the TPM window at arrival


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _prompt_text(body: Mapping[str, Any]) -> str:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _BadRequest("Invalid type for 'instructions': expected a string.", "instructions")
    parts = [instructions or ""]
    items = body.get("input", "")
    if isinstance(items, str):
        parts.append(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise _BadRequest("Invalid type for 'input': expected an object.", "input")
            if "content" in item:
                parts.append(_content_text(item["content"]))
            elif isinstance(item.get("output"), str):  # function_call_output
                parts.append(item["output"])
    else:
        raise _BadRequest("Invalid type for 'input': expected a string or an array.", "input")
    return "".join(parts)


# The output text is a window into this paragraph, repeated; the prompt's hash picks the first
# word, so the same prompt always gets the same text.
_CORPUS = (
    "Every call reserves a request slot and an estimate of its tokens before it is sent, and "
    "the estimate is reconciled with the real usage when the answer arrives. Waiters are served "
    "in order, a cancelled waiter leaves nothing behind, and a retry takes a new slot like any "
    "other attempt. The server counts a request when it arrives, so a slot must not be freed "
    "before the provider frees it, or the next window bursts into errors. "
) * 8
_WORD_STARTS = [0] + [i + 1 for i, ch in enumerate(_CORPUS) if ch == " "][:-1]


def _text_of(length: int, seed: int) -> str:
    if length <= 0:
        return ""
    start = _WORD_STARTS[seed % len(_WORD_STARTS)]
    source = _CORPUS * ((start + length) // len(_CORPUS) + 1)
    return source[start : start + length]


def _plan(body: Any, config: MockServerConfig) -> _Plan:
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    prompt = _prompt_text(body)
    input_tokens = math.ceil(len(prompt) / 4)
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    span = config.output_tokens_max - config.output_tokens_min + 1
    planned = config.output_tokens_min + digest % span
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None and effort not in _REASONING_SHARE:
        raise _BadRequest(
            f"Invalid value: '{effort}'. Supported values are: {sorted(_REASONING_SHARE)}.",
            "reasoning.effort",
            "invalid_value",
        )
    reasoning_tokens = int(planned * _REASONING_SHARE.get(effort or "none", 0.0))
    text_format = _mapping(body.get("text")).get("format") or {}
    if not isinstance(text_format, dict):
        raise _BadRequest("Invalid type for 'text.format': expected an object.", "text.format")
    if text_format.get("type") == "json_schema":
        schema = text_format.get("schema")
        if not isinstance(schema, dict):
            raise _BadRequest("Missing required parameter: 'text.format.schema'.", "text.format")
        try:
            instance = _instance(schema, schema, 0)
        except (TypeError, ValueError, AttributeError) as exc:
            raise _BadRequest(f"Invalid schema: {exc}.", "text.format.schema") from exc
        text = json.dumps(instance, separators=(",", ":"))
        visible = math.ceil(len(text) / 4)
    elif text_format.get("type") == "json_object":
        visible = planned - reasoning_tokens
        text = json.dumps({"answer": _text_of(max(4 * visible - 14, 0), digest)})
        visible = math.ceil(len(text) / 4)
    else:
        visible = planned - reasoning_tokens
        text = _text_of(4 * visible, digest)
    max_output = body.get("max_output_tokens")
    if max_output is not None and (
        isinstance(max_output, bool)
        or not isinstance(max_output, int)
        or max_output < _MIN_MAX_OUTPUT_TOKENS
    ):
        raise _BadRequest(
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
            f"{_MIN_MAX_OUTPUT_TOKENS}, but got {max_output} instead.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    output_tokens = reasoning_tokens + visible
    incomplete = max_output is not None and output_tokens > max_output
    if max_output is not None and incomplete:
        output_tokens = max_output
        reasoning_tokens = min(reasoning_tokens, max_output)
        text = text[: 4 * (max_output - reasoning_tokens)]
    return _Plan(
        model=model,
        prompt=prompt,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning_tokens,
        text=text,
        incomplete=incomplete,
        stream=body.get("stream") is True,
        charge=input_tokens + (max_output if max_output is not None else output_tokens),
    )


def _resolve(ref: str, root: Mapping[str, Any]) -> Any:
    if not ref.startswith("#"):
        raise _BadRequest(f"Unsupported $ref {ref!r}: only local refs.", "text.format.schema")
    node: Any = root
    for token in filter(None, ref[1:].split("/")):
        key = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            raise _BadRequest(f"Unresolvable $ref {ref!r}.", "text.format.schema")
        node = node[key]
    return node


def _instance(schema: Any, root: Mapping[str, Any], depth: int) -> Any:
    """A deterministic minimal instance of a JSON schema: required properties only."""
    if depth > 64:
        raise _BadRequest("The schema is too deeply nested or recursive.", "text.format.schema")
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return _instance(_resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            chosen = next((o for o in options if _mapping(o).get("type") != "null"), options[0])
            return _instance(chosen, root, depth + 1)
    if schema.get("allOf"):
        parts = [_instance(s, root, depth + 1) for s in schema["allOf"]]
        if all(isinstance(p, dict) for p in parts):
            return {k: v for p in parts for k, v in p.items()}
        return parts[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {
            name: _instance(props.get(name, {}), root, depth + 1)
            for name in schema.get("required", [])
        }
    if kind == "array":
        prefix = [_instance(s, root, depth + 1) for s in schema.get("prefixItems", [])]
        extra = max(int(schema.get("minItems", 0)) - len(prefix), 0)
        return prefix + [_instance(schema.get("items", {}), root, depth + 1) for _ in range(extra)]
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string(schema)


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    step = schema.get("multipleOf") or 1
    low = schema.get("minimum")
    if schema.get("exclusiveMinimum") is not None:
        low = schema["exclusiveMinimum"] + (1 if integer else step / 2)
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 0
    if low is not None and value < low:
        value = math.ceil(low / step) * step
    elif high is not None and value >= high:
        value = math.floor(high / step) * step
        if "exclusiveMaximum" in schema and value >= high:
            value -= step
    return int(value) if integer else float(value)


_FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "hostname": "example.com",
}


def _string(schema: Mapping[str, Any]) -> str:
    value = _FORMATS.get(str(schema.get("format")), "text")
    value = value.ljust(int(schema.get("minLength", 0)), "x")
    return value[: schema["maxLength"]] if "maxLength" in schema else value


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


# ---------------------------------------------------------------- response bodies


_ID_RANDOM = random.Random()  # seeded from the OS once; ids need uniqueness, not secrecy


def _new_id(prefix: str, size: int = 24) -> str:
    return f"{prefix}{_ID_RANDOM.getrandbits(size * 8):0{size * 2}x}"


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def _usage(plan: _Plan, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }


def _message(plan: _Plan, msg_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {
        "id": msg_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _response(
    plan: _Plan,
    body: Mapping[str, Any],
    ids: tuple[str, str],
    created_at: int,
    status: str,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Response object, echoing the request's settings the way the real API does."""
    reasoning = _mapping(body.get("reasoning"))
    text_config = _mapping(body.get("text"))
    output = []
    if status != "in_progress":
        output = [_message(plan, ids[1], status, plan.text)]
    return {
        "id": ids[0],
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": created_at if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {
            "format": text_config.get("format") or {"type": "text"},
            "verbosity": text_config.get("verbosity", "medium"),
        },
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _chunks(text: str, count: int) -> list[str]:
    size = max(math.ceil(len(text) / count), 1)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _sse(events: list[dict[str, Any]], first_seq: int) -> bytes:
    out = []
    for seq, event in enumerate(events, first_seq):
        event["sequence_number"] = seq
        out.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")
    return "".join(out).encode()


# ---------------------------------------------------------------- the server


class MockServer:
    """The local OpenAI-compatible server. ``async with MockServer(config) as server: server.url``.

    ``clock`` (monotonic seconds) drives the rate window, arrival times and retry-after; tests
    pass a fake clock to move the window without sleeping. Latency always sleeps for real.
    """

    def __init__(
        self, config: MockServerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config if config is not None else MockServerConfig()
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()
        self._log: deque[LogRecord] = deque(maxlen=self._config.log_max_records)
        self._arrival_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.reset()

    # -- public API

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); the SDK's base_url is ``url + "/v1"``."""
        if self._url is None:
            raise RuntimeError("MockServer is not running: call `await server.start()` first")
        return self._url

    @property
    def config(self) -> MockServerConfig:
        return self._config

    @property
    def log(self) -> list[LogRecord]:
        """A snapshot of the request log, oldest first (live records: statuses may still change)."""
        return list(self._log)

    def reset(self) -> None:
        """Clear the log, the rate window, the quota used and the prompt cache; reseed faults."""
        self._log = deque(maxlen=self._config.log_max_records)
        self._window = _Window()
        self._cache = _PrefixCache()
        self._quota_used = 0
        self._next_index = 0
        self._rng = random.Random(self._config.seed)

    def update_config(self, **changes: Any) -> MockServerConfig:
        """Change the config at runtime (validated). A new seed restarts the fault sequence."""
        names = {f.name for f in dataclasses.fields(MockServerConfig)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown MockServerConfig field(s) {unknown}; known: {sorted(names)}")
        new = dataclasses.replace(self._config, **changes)
        old, self._config = self._config, new
        if new.seed != old.seed:
            self._rng = random.Random(new.seed)
        if new.log_max_records != old.log_max_records:
            self._log = deque(self._log, maxlen=new.log_max_records)
        return new

    async def wait_for_arrivals(self, count: int) -> None:
        """Return once ``count`` arrivals reached /v1/responses since the last reset.

        For tests that must act while a request is at the server (cancel it, stop the server)
        without sleeping; bound it with ``asyncio.timeout``.
        """
        if self._next_index >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._arrival_waiters.append((count, waiter))
        try:
            await waiter
        finally:
            self._arrival_waiters = [(n, w) for n, w in self._arrival_waiters if w is not waiter]

    def arrivals_in_any_window(self, window_s: float, *, counted_only: bool = False) -> int:
        """The most arrivals in any window ``[t, t + window_s)``, from the log."""
        return max_arrivals_in_window(
            [r.arrival_monotonic for r in self._log if r.counted or not counted_only], window_s
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError(f"MockServer is already running at {self._url}")
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/responses", self._handle_responses)
        app.router.add_get("/_mock/log", self._handle_log)
        app.router.add_post("/_mock/reset", self._handle_reset)
        app.router.add_get("/_mock/config", self._handle_config)
        app.router.add_post("/_mock/config", self._handle_config)
        app.on_response_prepare.append(self._on_prepare)
        # handler_cancellation: a hung or slow handler ends when its client goes away.
        # shutdown_timeout is short because stop() wakes every waiting handler first.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        url_host = f"[{url_host}]" if ":" in url_host else url_host
        self._url = f"http://{url_host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop listening; hung and sleeping handlers drop their connections."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals

    def _capacities(self) -> tuple[int, int]:
        scale = self._config.window_s / 60
        rpm = self._config.rpm_limit or UNLIMITED
        tpm = self._config.tpm_limit or UNLIMITED
        # The epsilon keeps 240 * 1 / 60 from flooring to 3 through float error.
        return math.floor(rpm * scale + 1e-9), math.floor(tpm * scale + 1e-9)

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if "x-request-id" not in headers:
            headers["x-request-id"] = _new_id("req_", 16)
        config, window, now = self._config, self._window, self._clock()
        window.purge(now, config.window_s)
        cap_requests, cap_tokens = self._capacities()
        reset = (
            format_duration(window.entries[-1][0] + config.window_s - now)
            if window.entries
            else "0s"
        )
        headers["x-ratelimit-limit-requests"] = str(config.rpm_limit or UNLIMITED)
        headers["x-ratelimit-limit-tokens"] = str(config.tpm_limit or UNLIMITED)
        headers["x-ratelimit-remaining-requests"] = str(max(cap_requests - len(window.entries), 0))
        headers["x-ratelimit-remaining-tokens"] = str(max(cap_tokens - window.tokens, 0))
        headers["x-ratelimit-reset-requests"] = reset
        headers["x-ratelimit-reset-tokens"] = reset
        headers["openai-organization"] = ORGANIZATION
        headers["openai-version"] = "2020-10-01"

    def _answer(
        self, record: LogRecord, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        record.status = status
        return web.Response(
            status=status,
            body=body,
            content_type="application/json",
            headers={"x-request-id": record.request_id, **(headers or {})},
        )

    def _error(
        self,
        record: LogRecord,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        record.error_type = type_
        return self._answer(record, status, _error_body(message, type_, code, param), headers)

    def _rate_limited(
        self, record: LogRecord, kind: str, used: int, requested: int, wait_s: float
    ) -> web.Response:
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        limit = (
            self._config.rpm_limit if kind == "requests" else self._config.tpm_limit
        ) or UNLIMITED
        message = (
            f"Rate limit reached for {record.model} in organization {ORGANIZATION} on {unit}: "
            f"Limit {limit}, Used {used}, Requested {requested}. "
            f"Please try again in {format_duration(wait_s)}. {_RATE_DOCS}"
        )
        wait_ms = max(_ceil_ms(wait_s), 1)
        headers = {"retry-after-ms": str(wait_ms), "retry-after": str(math.ceil(wait_ms / 1000))}
        return self._error(record, 429, message, kind, "rate_limit_exceeded", None, headers)

    def _pick_fault(self, index: int, draw: float) -> Fault | None:
        script = self._config.fault_script
        if index < len(script):
            return Fault(script[index]) if script[index] not in ("", "none") else None
        for name, fault in _FAULT_RATE_FIELDS:
            rate = getattr(self._config, name)
            if draw < rate:
                return fault
            draw -= rate
        return None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return False at once when the server is stopping."""
        if self._closing.is_set():
            return False
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return True
        return False

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        # Aborting the transport closes the socket at once; aiohttp then discards the
        # response returned here, so the client sees a connection closed without an answer.
        if request.transport is not None:
            request.transport.abort()
        return web.Response()

    async def _handle_responses(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        config, now = self._config, self._clock()
        index, self._next_index = self._next_index, self._next_index + 1
        # Two draws for every arrival, whatever happens to it, so the n-th arrival's fault
        # and jitter depend only on the seed and n.
        fault_draw, jitter_draw = self._rng.random(), self._rng.random()
        authorization = request.headers.get("Authorization")
        record = LogRecord(
            index=index,
            arrival_monotonic=now,
            arrival_wall=time.time(),
            request_id=_new_id("req_", 16),
            client_request_id=request.headers.get("x-client-request-id"),
            authorization_present=authorization is not None,
        )
        self._log.append(record)
        for count, waiter in self._arrival_waiters:
            if count <= self._next_index and not waiter.done():
                waiter.set_result(None)
        if (
            config.require_api_key is not None
            and authorization != f"Bearer {config.require_api_key}"
        ):
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                if authorization is None
                else "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            code = None if authorization is None else "invalid_api_key"
            return self._error(record, 401, message, "invalid_request_error", code)
        try:
            body = json.loads(raw)
            plan = _plan(body, config)
        except _BadRequest as exc:
            return self._error(
                record, 400, exc.message, "invalid_request_error", exc.code, exc.param
            )
        except ValueError:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)"
            )
            return self._error(record, 400, message, "invalid_request_error", None)
        record.model, record.stream, record.input_tokens = (
            plan.model,
            plan.stream,
            plan.input_tokens,
        )

        if config.token_quota is not None and self._quota_used >= config.token_quota:
            return self._error(
                record, 429, _QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"
            )
        window = self._window
        window.purge(now, config.window_s)
        cap_requests, cap_tokens = self._capacities()
        if config.tpm_limit is not None and plan.charge > cap_tokens:
            message = (
                f"Request too large for {plan.model} in organization {ORGANIZATION} on tokens "
                f"per min (TPM): Limit {config.tpm_limit}, Requested {plan.charge}. The input or "
                f"output tokens must be reduced in order to run successfully. {_RATE_DOCS}"
            )
            return self._error(record, 429, message, "tokens", "rate_limit_exceeded")
        need_requests = len(window.entries) + 1 - cap_requests if config.rpm_limit else 0
        need_tokens = window.tokens + plan.charge - cap_tokens if config.tpm_limit else 0
        if need_requests > 0 or need_tokens > 0:
            wait = window.wait_for(now, config.window_s, max(need_requests, 0), max(need_tokens, 0))
            if need_requests > 0:
                return self._rate_limited(record, "requests", len(window.entries), 1, wait)
            return self._rate_limited(record, "tokens", window.tokens, plan.charge, wait)

        fault = self._pick_fault(index, fault_draw)
        record.fault = fault.value if fault is not None else None
        if fault is Fault.RATE_LIMIT_429:
            limit = config.rpm_limit or UNLIMITED
            return self._rate_limited(record, "requests", limit, 1, config.fault_429_retry_after_s)
        window.entries.append((now, plan.charge))
        window.tokens += plan.charge
        record.counted = True
        if fault is Fault.DROP:
            return self._drop(request)
        if fault is Fault.HANG:
            await self._closing.wait()
            return self._drop(request)
        if fault in (Fault.HTTP_500, Fault.HTTP_503):
            delay = config.latency_s + jitter_draw * config.latency_jitter_s
            if delay > 0 and not await self._sleep(delay):
                return self._drop(request)
            if fault is Fault.HTTP_500:
                message = "The server had an error while processing your request. Sorry about that!"
                return self._error(record, 500, message, "server_error", None)
            message = "The server is overloaded or not ready yet."
            return self._error(record, 503, message, "server_error", None)

        # Served: bill it, consult the prompt cache, then answer (after latency or slow_s).
        cached = self._cache.lookup_and_add(plan.prompt)
        self._quota_used += plan.input_tokens + plan.output_tokens
        record.cached_tokens, record.output_tokens = cached, plan.output_tokens
        record.reasoning_tokens = plan.reasoning_tokens
        delay = (
            config.slow_s
            if fault is Fault.SLOW
            else (config.latency_s + jitter_draw * config.latency_jitter_s)
        )
        usage = None if fault is Fault.MISSING_USAGE else _usage(plan, cached)
        if plan.stream:
            return await self._stream(request, record, plan, body, usage, fault, delay)
        if delay > 0 and not await self._sleep(delay):
            return self._drop(request)
        status = "incomplete" if plan.incomplete else "completed"
        ids = (_new_id("resp_"), _new_id("msg_"))
        payload = json.dumps(_response(plan, body, ids, int(time.time()), status, usage)).encode()
        if fault is Fault.MALFORMED_JSON:
            payload = payload[: len(payload) // 2]
        return self._answer(record, 200, payload)

    async def _stream(
        self,
        request: web.Request,
        record: LogRecord,
        plan: _Plan,
        body: Mapping[str, Any],
        usage: dict[str, Any] | None,
        fault: Fault | None,
        delay: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "x-request-id": record.request_id,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        await response.prepare(request)
        record.status = 200
        ids, created_at = (_new_id("resp_"), _new_id("msg_")), int(time.time())
        started = _response(plan, body, ids, created_at, "in_progress", None)
        head = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
        ]
        await response.write(_sse(head, 0))
        if delay > 0 and not await self._sleep(delay):
            self._drop(request)
            return response
        if fault is Fault.MALFORMED_JSON:
            await response.write(b'event: response.output_text.delta\ndata: {"type": "resp\n\n')
            await response.write_eof()
            return response
        status = "incomplete" if plan.incomplete else "completed"
        where = {"item_id": ids[1], "output_index": 0}
        part = {**where, "content_index": 0}
        events: list[dict[str, Any]] = [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": _message(plan, ids[1], "in_progress", None),
            },
            {"type": "response.content_part.added", **part, "part": _text_part("")},
        ]
        events += [
            {"type": "response.output_text.delta", **part, "delta": chunk, "logprobs": []}
            for chunk in _chunks(plan.text, self._config.stream_chunks)
        ]
        events += [
            {"type": "response.output_text.done", **part, "text": plan.text, "logprobs": []},
            {"type": "response.content_part.done", **part, "part": _text_part(plan.text)},
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": _message(plan, ids[1], status, plan.text),
            },
            {
                "type": f"response.{status}",
                "response": _response(plan, body, ids, created_at, status, usage),
            },
        ]
        await response.write(_sse(events, len(head)))
        await response.write_eof()
        return response

    async def _handle_log(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            message = f"since={request.query['since']!r}: expected an arrival index (integer)"
            body = _error_body(message, "invalid_request_error", None, "since")
            return web.Response(status=400, body=body, content_type="application/json")
        records = [r.to_dict() for r in self._log if r.index >= since]
        return web.json_response({"records": records})

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _handle_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of MockServerConfig fields")
                self.update_config(**changes)
            except (ValueError, TypeError) as exc:
                body = _error_body(str(exc), "invalid_request_error", None)
                return web.Response(status=400, body=body, content_type="application/json")
        return web.json_response(self._config.to_dict())


# ---------------------------------------------------------------- CLI and child process


def serve(
    config: MockServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the server until Ctrl-C or SIGTERM (blocking). ``on_ready`` receives the URL."""

    async def main() -> None:
        server = MockServer(config)
        url = await server.start(host, port)
        stopping = asyncio.Event()
        # Explicit handlers also work where SIGINT is ignored (a background job of a script).
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
        if on_ready is not None:
            on_ready(url)
        try:
            await stopping.wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _field_parser(name: str) -> tuple[Callable[[str], Any], str]:
    hint = get_type_hints(MockServerConfig)[name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is tuple:
        return (lambda text: tuple(s.strip() for s in text.split(",") if s.strip())), "A,B"
    return hint, hint.__name__.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one option per MockServerConfig field."""
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    for f in dataclasses.fields(MockServerConfig):
        parse, metavar = _field_parser(f.name)
        default = "none" if f.default is None else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse,
            default=None,
            metavar=metavar,
            help=f"{f.metadata.get('help', '')} (default {default})",
        )


def run_from_args(args: argparse.Namespace) -> int:
    """``llmtrail mock-server``: print the URL, serve until Ctrl-C; 0 on a clean stop."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(MockServerConfig)
        if getattr(args, f.name, None) is not None
    }
    try:
        config = MockServerConfig(**given)
    except ValueError as exc:
        print(f"llmtrail mock-server: {exc}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(url, flush=True)
        print(f"llmtrail mock-server: POST {url}/v1/responses; Ctrl-C to stop", file=sys.stderr)

    try:
        serve(config, args.host, args.port, on_ready=ready)
    except OSError as exc:
        print(
            f"llmtrail mock-server: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _config_argv(config: MockServerConfig) -> list[str]:
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or value == f.default:
            continue
        text = ",".join(value) if isinstance(value, tuple) else repr(value)
        argv += ["--" + f.name.replace("_", "-"), text.strip("'")]
    return argv


def run_in_process(
    config: MockServerConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 30.0,
) -> tuple[str, Callable[[], None]]:
    """Start ``python -m pipeline._mock_server`` in a child process: ``(url, stop)``.

    A benchmark's client then does not share a core with the server. ``stop()`` sends SIGTERM
    and waits (SIGKILL after 10 s); it is idempotent.
    """
    # Run this file as __main__ rather than `-m pipeline._mock_server`: importing the package
    # imports the openai SDK (seconds on a busy machine), which the server never uses. This
    # is why this module imports nothing from `pipeline`.
    bootstrap = f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')"
    argv = [sys.executable, "-c", bootstrap, "--host", host, "--port", str(port)]
    argv += _config_argv(config or MockServerConfig())
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], startup_timeout_s)
    url = proc.stdout.readline().strip() if readable else ""
    if not url.startswith("http"):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(
            f"the mock server child process reported no URL within {startup_timeout_s}s "
            f"(exit code {proc.returncode}); run `python -m pipeline._mock_server "
            f"{' '.join(argv[3:])}` to see why"
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    return url, stop


@contextlib.contextmanager
def running_in_process(config: MockServerConfig | None = None, **kwargs: Any) -> Iterator[str]:
    """``with running_in_process(config) as url:`` a server in a child process."""
    url, stop = run_in_process(config, **kwargs)
    try:
        yield url
    finally:
        stop()


@contextlib.contextmanager
def running_in_thread(
    config: MockServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[MockServer]:
    """``with running_in_thread(config) as server:`` a server on its own loop in a thread.

    For synchronous tests that also want ``server.log`` in process. Read the log from the
    test thread only after the calls under test have returned.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="llmtrail-mock-server", daemon=True)
    thread.start()
    server = MockServer(config)
    try:
        asyncio.run_coroutine_threadsafe(server.start(host, port), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline._mock_server",
        description="A local OpenAI-compatible server (POST /v1/responses).",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_main())

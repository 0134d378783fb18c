"""The mock server's answers: the usage model, schema instances and response / SSE bodies.

Everything here is a pure function of the request body and its arguments (ids aside): the
server's state (rate window, prompt cache, quota, faults) lives in
:mod:`llmtrail.testing._mock_server`, which calls :func:`plan_request` once per arrival and
builds its answer from the plan.

This module imports nothing from ``pipeline``: the server runs it in a child process that must
not import the package (and with it the openai SDK).

Usage model (documented so that tests can predict it):
- ``input_tokens = ceil(chars / 4)`` over ``instructions`` plus the text of every input message.
- The planned output is ``output_tokens_min..output_tokens_max`` tokens, picked by a sha256 of
  the prompt. With ``reasoning.effort``, a share of it is reasoning (``_REASONING_SHARE``); the
  rest is visible text of 4 characters per token. A ``json_schema`` format replaces the text by a
  minimal valid instance of the schema, and its visible tokens are ``ceil(len(json) / 4)``.
- ``max_output_tokens`` caps reasoning + visible tokens: the answer is then ``incomplete`` with
  reason ``max_output_tokens`` and the text is cut to 4 characters per remaining token.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BadRequest",
    "Plan",
    "chat_as_responses",
    "chat_body",
    "chat_chunks",
    "chat_usage",
    "error_body",
    "is_text_delta",
    "new_id",
    "plan_request",
    "response_body",
    "sse",
    "sse_data",
    "stream_head",
    "stream_tail",
    "usage_of",
]

# The share of the planned output that is reasoning, per reasoning.effort.
_REASONING_SHARE = {
    "none": 0.0,
    "minimal": 0.125,
    "low": 0.25,
    "medium": 0.5,
    "high": 0.75,
    "xhigh": 0.875,
}
_MIN_MAX_OUTPUT_TOKENS = 16  # the real API rejects smaller values


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(slots=True)
class Plan:
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
        raise BadRequest("Invalid type for 'instructions': expected a string.", "instructions")
    parts = [instructions or ""]
    items = body.get("input", "")
    if isinstance(items, str):
        parts.append(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest("Invalid type for 'input': expected an object.", "input")
            if "content" in item:
                parts.append(_content_text(item["content"]))
            elif isinstance(item.get("output"), str):  # function_call_output
                parts.append(item["output"])
    else:
        raise BadRequest("Invalid type for 'input': expected a string or an array.", "input")
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


def plan_request(body: Any, *, output_tokens_min: int, output_tokens_max: int) -> Plan:
    """What ``body`` will produce; raises BadRequest where the real API answers 400."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    prompt = _prompt_text(body)
    input_tokens = math.ceil(len(prompt) / 4)
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    span = output_tokens_max - output_tokens_min + 1
    planned = output_tokens_min + digest % span
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None and effort not in _REASONING_SHARE:
        raise BadRequest(
            f"Invalid value: '{effort}'. Supported values are: {sorted(_REASONING_SHARE)}.",
            "reasoning.effort",
            "invalid_value",
        )
    reasoning_tokens = int(planned * _REASONING_SHARE.get(effort or "none", 0.0))
    text_format = _mapping(body.get("text")).get("format") or {}
    if not isinstance(text_format, dict):
        raise BadRequest("Invalid type for 'text.format': expected an object.", "text.format")
    if text_format.get("type") == "json_schema":
        schema = text_format.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("Missing required parameter: 'text.format.schema'.", "text.format")
        try:
            instance = _instance(schema, schema, 0)
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadRequest(f"Invalid schema: {exc}.", "text.format.schema") from exc
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
        raise BadRequest(
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
    return Plan(
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
        raise BadRequest(f"Unsupported $ref {ref!r}: only local refs.", "text.format.schema")
    node: Any = root
    for token in filter(None, ref[1:].split("/")):
        key = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            raise BadRequest(f"Unresolvable $ref {ref!r}.", "text.format.schema")
        node = node[key]
    return node


def _instance(schema: Any, root: Mapping[str, Any], depth: int) -> Any:
    """A deterministic minimal instance of a JSON schema: required properties only."""
    if depth > 64:
        raise BadRequest("The schema is too deeply nested or recursive.", "text.format.schema")
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


# ---------------------------------------------------------------- response bodies


_ID_RANDOM = random.Random()  # seeded from the OS once; ids need uniqueness, not secrecy


def new_id(prefix: str, size: int = 24) -> str:
    return f"{prefix}{_ID_RANDOM.getrandbits(size * 8):0{size * 2}x}"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def usage_of(plan: Plan, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }


def _message(plan: Plan, msg_id: str, status: str, text: str | None) -> dict[str, Any]:
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


def response_body(
    plan: Plan,
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


def sse(events: list[dict[str, Any]], first_seq: int) -> bytes:
    out = []
    for seq, event in enumerate(events, first_seq):
        event["sequence_number"] = seq
        out.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")
    return "".join(out).encode()


def stream_head(
    plan: Plan, body: Mapping[str, Any], ids: tuple[str, str], created_at: int
) -> list[dict[str, Any]]:
    """The events sent before the latency: ``response.created`` and ``response.in_progress``."""
    started = response_body(plan, body, ids, created_at, "in_progress", None)
    return [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
    ]


def stream_tail(
    plan: Plan,
    body: Mapping[str, Any],
    ids: tuple[str, str],
    created_at: int,
    status: str,
    usage: dict[str, Any] | None,
    chunks: int,
) -> list[dict[str, Any]]:
    """The events after the latency: the message, ``chunks`` text deltas, the final response."""
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
        for chunk in _chunks(plan.text, chunks)
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
            "response": response_body(plan, body, ids, created_at, status, usage),
        },
    ]
    return events


# ---------------------------------------------------------------- Chat Completions


def chat_as_responses(body: Any) -> dict[str, Any]:
    """A Chat Completions request body in Responses terms, for :func:`plan_request`.

    The messages become the input (a system message's text counts like ``instructions``), so
    the same conversation gets the same usage and text from either API.
    """
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    out: dict[str, Any] = {"model": body.get("model"), "input": messages}
    out["stream"] = body.get("stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        out["max_output_tokens"] = max_tokens
    if body.get("reasoning_effort") is not None:
        out["reasoning"] = {"effort": body["reasoning_effort"]}
    response_format = _mapping(body.get("response_format"))
    if response_format.get("type") == "json_schema":
        schema = _mapping(response_format.get("json_schema")).get("schema")
        out["text"] = {"format": {"type": "json_schema", "schema": schema}}
    elif response_format.get("type") == "json_object":
        out["text"] = {"format": {"type": "json_object"}}
    return out


def chat_usage(plan: Plan, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_body(
    plan: Plan, chat_id: str, created: int, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": plan.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if plan.incomplete else "stop",
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }


def chat_chunks(
    plan: Plan, chat_id: str, created: int, usage: dict[str, Any] | None, chunks: int
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream: a role chunk, ``chunks`` content
    chunks, a finish chunk and, when ``usage`` is given, the usage chunk without choices."""
    base = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": plan.model,
        "system_fingerprint": "fp_mock",
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], "usage": None}

    out = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    out += [chunk({"content": part}, None) for part in _chunks(plan.text, chunks)]
    out.append(chunk({}, "length" if plan.incomplete else "stop"))
    if usage is not None:
        out.append({**base, "choices": [], "usage": usage})
    return out


def sse_data(events: list[dict[str, Any]], *, done: bool) -> bytes:
    """Data-only server-sent events (Chat Completions' framing), ending ``[DONE]`` if ``done``."""
    out = [f"data: {json.dumps(event)}\n\n" for event in events]
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def is_text_delta(event: Mapping[str, Any]) -> bool:
    """Whether a stream event of either API carries text."""
    if event.get("type") == "response.output_text.delta":
        return True
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return bool(_mapping(_mapping(choices[0]).get("delta")).get("content"))

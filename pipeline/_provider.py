"""The OpenAI Responses API provider, through the official SDK: plain and streamed.

Invariants (the client, the error classification and the stream reader are shared with the
Chat Completions provider: see :mod:`pipeline._openai_common`):
- The model is an argument of every call; there is no shared "current model".
- The request goes through the SDK's own request path (``client.post`` with ``cast_to`` the
  raw HTTP response: its headers, auth, timeout and status errors), with the body built here
  instead of by ``responses.create``; the answer is read here from its JSON instead of into
  the SDK's ``Response`` model. ``responses.create`` re-checks every parameter against its
  TypedDicts and ``construct``s the full model by reflection: about 250 µs of CPU per call,
  a sixth of the SDK's whole cost per call against a fast server, for fields this provider
  never reads. What is read (output text, usage, status, ids) is read exactly as the SDK's
  ``Response.output_text`` and ``usage`` do, and anything missing or mistyped is an
  ``invalid_response``.
- A streamed call (:meth:`OpenAIResponsesProvider.open_stream`) sends ``stream: true`` and reads
  ``response.output_text.delta`` events for the text and the final ``response.completed`` (or
  ``response.incomplete``) event for the usage, ids and status.
- The client carries the send-time hook (:func:`~pipeline._send_time.attach_send_trace`): an
  attempt that set a body-sent callback learns when its body was written.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
from openai.lib._parsing._responses import type_to_text_format_param

from ._errors import ErrorType
from ._openai_common import (
    RATE_LIMIT_HEADERS,
    OpenAIProviderBase,
    OpenAIStream,
    Usage4,
    classify_status,
    count,
    parse_answer,
)
from ._provider_types import ProviderError, ProviderResponse
from ._types import GenerationRequest

__all__ = ["OpenAIResponsesProvider", "RATE_LIMIT_HEADERS", "classify_status"]


class OpenAIResponsesProvider(OpenAIProviderBase):
    """Calls ``POST /v1/responses`` once per :meth:`invoke` or :meth:`open_stream`."""

    name = "openai"
    api = "responses"

    def _params(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        params: dict[str, Any] = {"model": model, "store": request.store}
        if request.input:
            params["input"] = [
                {"role": m.get("role", "user"), "content": m["content"]} for m in request.input
            ]
        else:
            params["input"] = request.user_prompt
        if request.system_prompt:
            params["instructions"] = request.system_prompt
        if request.max_output_tokens is not None:
            params["max_output_tokens"] = request.max_output_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.reasoning_effort is not None:
            params["reasoning"] = {"effort": request.reasoning_effort}
        if request.previous_response_id is not None:
            params["previous_response_id"] = request.previous_response_id
        if request.response_schema is not None:
            params["text"] = {"format": type_to_text_format_param(request.response_schema)}
        return params

    async def invoke(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ProviderResponse:
        raw = await self._post(
            "/responses", self._params(request, model), timeout_s, client_request_id
        )
        return self._parse(raw, request)

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ResponsesStream:
        body = {**self._params(request, model), "stream": True}
        events = await self._post_stream("/responses", body, timeout_s, client_request_id)
        return ResponsesStream(events, request, timeout_s)

    def _parse(self, raw: httpx2.Response, request: GenerationRequest) -> ProviderResponse:
        return parse_answer(raw, request, _read)


def _read(answer: dict[str, Any], usage: dict[str, Any]) -> tuple[str, list[str], Usage4]:
    """A Response object's text, finish reasons and tokens."""
    tokens = (
        count(usage, "input_tokens", required=True),
        count(usage.get("input_tokens_details"), "cached_tokens"),
        count(usage, "output_tokens", required=True),
        count(usage.get("output_tokens_details"), "reasoning_tokens"),
    )
    return _output_text(answer.get("output")), _finish_reasons(answer), tokens


def _finish_reasons(response: dict[str, Any]) -> list[str]:
    status = response.get("status")
    incomplete = response.get("incomplete_details")
    if status == "incomplete" and isinstance(incomplete, dict):
        return [str(incomplete.get("reason") or "incomplete")]
    return ["stop"] if status == "completed" else [str(status)]


class ResponsesStream(OpenAIStream):
    """The events of a streamed Responses API answer."""

    def _on_event(self, data: dict[str, Any]) -> str | None:
        kind = data.get("type")
        if kind == "response.output_text.delta":
            delta = data["delta"]
            if not isinstance(delta, str):
                raise TypeError(f"delta is a {type(delta).__name__}")
            return delta
        if kind in ("response.created", "response.completed", "response.incomplete"):
            response = data["response"]
            if not isinstance(response, dict):
                raise TypeError("the event's response is not an object")
            response_id, response_model = response.get("id"), response.get("model")
            self.response_id = response_id if isinstance(response_id, str) else None
            self.response_model = response_model if isinstance(response_model, str) else None
            if kind != "response.created":
                self.finish_reasons = _finish_reasons(response)
                self._usage_from(
                    response.get("usage"),
                    "input_tokens",
                    "output_tokens",
                    "input_tokens_details",
                    "output_tokens_details",
                )
        elif kind in ("error", "response.failed"):
            error = data.get("response", {}).get("error") if kind == "response.failed" else data
            error = error if isinstance(error, dict) else {}
            code = error.get("code")
            raise ProviderError(
                ErrorType.STREAM_BROKEN,
                f"the server sent {kind} mid-stream: {error.get('message')}",
                retryable=False,
                status=self.status,
                provider_code=code if isinstance(code, str) else None,
                provider_request_id=self.provider_request_id,
            )
        return None


def _output_text(output: Any) -> str:
    """The text of every ``output_text`` part of every ``message`` item, joined: what the SDK's
    ``Response.output_text`` returns. Other items (reasoning, tool calls) carry no text."""
    if output is None:
        return ""
    if not isinstance(output, list):
        raise TypeError(f"output is a {type(output).__name__}, not a list")
    texts: list[str] = []
    for item in output:
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text":
                    text = part["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"output_text.text is a {type(text).__name__}")
                    texts.append(text)
    return "".join(texts)


def dumps_schema(schema: type[Any]) -> str:
    """The strict JSON schema the provider is sent for ``schema`` (for docs and tests)."""
    return json.dumps(type_to_text_format_param(schema))

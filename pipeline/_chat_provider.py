"""The Chat Completions provider (``POST /v1/chat/completions``), through the official SDK.

This is the API every OpenAI-compatible server speaks (vLLM, Ollama, llama.cpp's server,
Azure OpenAI, Groq, Together, OpenRouter, LiteLLM's proxy): point ``base_url`` at it.

Invariants (the client, the error classification and the stream reader are shared with the
Responses provider: see :mod:`pipeline._openai_common`):
- The request is the SDK's own request path with the body built here, as for the Responses
  provider; the answer is read from its JSON: ``choices[0].message.content``, ``usage`` with
  ``prompt_tokens`` (cached ones in ``prompt_tokens_details``) and ``completion_tokens``
  (reasoning ones in ``completion_tokens_details``), the same meaning as the Responses API's
  input and output tokens, so pricing and projections need nothing else.
- A streamed call asks for ``stream_options.include_usage``: the server then sends the usage in
  a last chunk without choices. A server that ignores it (older vLLM and Ollama builds) sends
  none; the stream's usage is then the documented estimate of
  :meth:`~pipeline._openai_common.OpenAIStream.snapshot`, flagged ``usage_estimated``.
- ``response_schema`` becomes ``response_format`` ``json_schema`` (strict), exactly what the
  SDK's ``chat.completions.parse`` sends.
- Only parameters the request sets are sent (``store`` only when true): strict
  OpenAI-compatible servers reject unknown or unsupported fields.
"""

from __future__ import annotations

from typing import Any, Literal

import httpx2
from openai.lib._parsing._completions import type_to_response_format_param

from ._errors import ConfigurationError, ErrorType
from ._openai_common import (
    OpenAIProviderBase,
    OpenAIStream,
    Usage4,
    count,
    parse_answer,
)
from ._provider import OpenAIResponsesProvider
from ._provider_types import ProviderError, ProviderResponse
from ._types import GenerationRequest
from .typing import Provider

__all__ = ["ChatStream", "OpenAIChatProvider", "builtin_provider"]


class OpenAIChatProvider(OpenAIProviderBase):
    """Calls ``POST /v1/chat/completions`` once per :meth:`invoke` or :meth:`open_stream`.

    ``max_tokens_param`` names the field ``max_output_tokens`` is sent as:
    ``max_completion_tokens`` (OpenAI and Azure OpenAI; required by reasoning models) or
    ``max_tokens`` (older OpenAI-compatible servers that do not know the new name).
    """

    # The budget (the shared gates' key) belongs to the API key and model, whichever API
    # spends it: the same name as the Responses provider's; ``api`` tells them apart.
    name = "openai"
    api = "chat"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_connections: int = 100,
        http_client: httpx2.AsyncClient | None = None,
        organization: str | None = None,
        max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = (
            "max_completion_tokens"
        ),
    ) -> None:
        if max_tokens_param not in ("max_completion_tokens", "max_tokens"):
            raise ConfigurationError(
                f"max_tokens_param={max_tokens_param!r} is invalid: use "
                "'max_completion_tokens' or 'max_tokens'"
            )
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            max_connections=max_connections,
            http_client=http_client,
            organization=organization,
        )
        self.max_tokens_param = max_tokens_param

    def _params(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        if request.previous_response_id is not None:
            raise ProviderError(
                ErrorType.VALIDATION,
                "previous_response_id is a Responses API feature that Chat Completions lacks: "
                "send the conversation in GenerationRequest.input, or use provider='openai'",
                retryable=False,
                reached_provider=False,
            )
        params: dict[str, Any] = {"model": model, "messages": request.messages()}
        if request.max_output_tokens is not None:
            params[self.max_tokens_param] = request.max_output_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.reasoning_effort is not None:
            params["reasoning_effort"] = request.reasoning_effort
        if request.response_schema is not None:
            params["response_format"] = type_to_response_format_param(request.response_schema)
        if request.store:
            params["store"] = True
        return params

    async def invoke(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ProviderResponse:
        body = self._params(request, model)
        raw = await self._post("/chat/completions", body, timeout_s, client_request_id)
        return self._parse(raw, request)

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        model: str,
        timeout_s: float,
        client_request_id: str | None = None,
    ) -> ChatStream:
        body = {
            **self._params(request, model),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = await self._post_stream("/chat/completions", body, timeout_s, client_request_id)
        return ChatStream(events, request, timeout_s)

    def _parse(self, raw: httpx2.Response, request: GenerationRequest) -> ProviderResponse:
        return parse_answer(raw, request, _read)


def _read(answer: dict[str, Any], usage: dict[str, Any]) -> tuple[str, list[str], Usage4]:
    """A chat completion's text (of its first choice), finish reason and tokens."""
    choice = _first_choice(answer.get("choices"))
    text = (choice.get("message") or {}).get("content") or ""
    if not isinstance(text, str):
        raise TypeError(f"message.content is a {type(text).__name__}")
    finish = choice.get("finish_reason")
    return text, [str(finish)] if finish is not None else [], _usage(usage)


def _first_choice(choices: Any) -> dict[str, Any]:
    if not isinstance(choices, list):
        raise TypeError(f"choices is a {type(choices).__name__}, not a list")
    if not choices:
        raise ValueError("choices is empty")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise TypeError("choices[0] is not an object")
    return choice


def _usage(usage: dict[str, Any]) -> Usage4:
    """(input, cached, output, reasoning) of a Chat Completions usage object."""
    return (
        count(usage, "prompt_tokens", required=True),
        count(usage.get("prompt_tokens_details"), "cached_tokens"),
        count(usage, "completion_tokens", required=True),
        count(usage.get("completion_tokens_details"), "reasoning_tokens"),
    )


class ChatStream(OpenAIStream):
    """The chunks of a streamed Chat Completions answer."""

    def _on_event(self, data: dict[str, Any]) -> str | None:
        chunk_id, chunk_model = data.get("id"), data.get("model")
        if self.response_id is None and isinstance(chunk_id, str):
            self.response_id = chunk_id
        if self.response_model is None and isinstance(chunk_model, str):
            self.response_model = chunk_model
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = _usage(usage)
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError(f"choices is a {type(choices).__name__}, not a list")
        if not choices:
            return None
        choice = choices[0]
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finish_reasons = [str(finish)]
        delta = (choice.get("delta") or {}).get("content")
        if delta is not None and not isinstance(delta, str):
            raise TypeError(f"delta.content is a {type(delta).__name__}")
        return delta


def builtin_provider(
    name: str, api_key: str | None, base_url: str | None, max_connections: int
) -> Provider:
    """``provider="openai"`` (the Responses API) or ``"openai-chat"`` (Chat Completions, the
    API of every OpenAI-compatible server)."""
    if name in ("openai", "openai-responses"):
        return OpenAIResponsesProvider(
            api_key=api_key, base_url=base_url, max_connections=max_connections
        )
    if name == "openai-chat":
        return OpenAIChatProvider(
            api_key=api_key, base_url=base_url, max_connections=max_connections
        )
    raise ConfigurationError(
        f"provider={name!r} is unknown: use 'openai' (Responses API), 'openai-chat' (Chat "
        "Completions, for OpenAI-compatible servers) or a Provider instance"
    )

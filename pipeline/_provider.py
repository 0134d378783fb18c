"""The OpenAI Responses API provider, through the official SDK.

Invariants:
- One ``AsyncOpenAI`` client per provider, created with ``max_retries=0``: the service's
  tenacity loop is the only retry layer. It is closed with the provider.
- The model is an argument of every call; there is no shared "current model".
- Every failure becomes a classified :class:`~pipeline.typing.ProviderError`; cancellation
  passes through untouched.
- The request goes through the SDK's own request path (``client.post`` with ``cast_to`` the
  raw HTTP response: its headers, auth, timeout and status errors), with the body built here
  instead of by ``responses.create``; the answer is read here from its JSON instead of into
  the SDK's ``Response`` model. ``responses.create`` re-checks every parameter against its
  TypedDicts and ``construct``s the full model by reflection: about 250 µs of CPU per call,
  a sixth of the SDK's whole cost per call against a fast server, for fields this provider
  never reads. What is read (output text, usage, status, ids) is read exactly as the SDK's
  ``Response.output_text`` and ``usage`` do, and anything missing or mistyped is an
  ``invalid_response``.
- The client carries the send-time hook (:func:`~pipeline._send_time.attach_send_trace`): an
  attempt that set a body-sent callback learns when its body was written.
- The API key never leaves the SDK client: it is not stored here, logged or put in errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from openai._types import RequestOptions
from openai.lib._parsing._responses import type_to_text_format_param

from ._errors import ErrorType
from ._send_time import attach_send_trace
from ._types import GenerationRequest
from .typing import ProviderError, ProviderResponse

__all__ = ["OpenAIResponsesProvider", "RATE_LIMIT_HEADERS", "classify_status"]

RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
_MAX_MESSAGE = 500


def _rate_limits(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    return {name: headers[name] for name in RATE_LIMIT_HEADERS if name in headers}


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(float(raw_ms) / 1000.0, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return max(float(raw), 0.0)
        except ValueError:
            return None  # an HTTP date: rare from OpenAI; fall back to backoff
    return None


def classify_status(status: int, code: str | None) -> tuple[ErrorType, bool]:
    """(error_type, retryable) for an HTTP error status and the body's error code."""
    if status == 429:
        if code == "insufficient_quota":
            return ErrorType.QUOTA_EXCEEDED, False
        return ErrorType.RATE_LIMITED, True
    if status == 408:
        return ErrorType.TIMEOUT, True
    if status == 409:
        return ErrorType.CONFLICT, True
    if status >= 500:
        return ErrorType.SERVER_ERROR, True
    if status in (401, 403):
        return ErrorType.AUTH, False
    return ErrorType.BAD_REQUEST, False


def _short(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


class OpenAIResponsesProvider:
    """Calls ``POST /v1/responses`` once per :meth:`invoke`."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_connections: int = 100,
        http_client: httpx2.AsyncClient | None = None,
        organization: str | None = None,
    ) -> None:
        self._owns_http = http_client is None
        self.http_client = http_client or httpx2.AsyncClient(
            limits=httpx2.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=httpx2.Timeout(600.0, connect=10.0),
        )
        # The send-time hook (pipeline._send_time): when each attempt's body was written.
        hooks = self.http_client.event_hooks
        if attach_send_trace not in hooks["request"]:
            self.http_client.event_hooks = {
                **hooks,
                "request": [*hooks["request"], attach_send_trace],
            }
        try:
            self._client = openai.AsyncOpenAI(
                api_key=api_key,
                base_url=base_url,
                organization=organization,
                max_retries=0,
                http_client=self.http_client,
            )
        except openai.OpenAIError as exc:
            from ._errors import ConfigurationError

            raise ConfigurationError(
                f"cannot create the OpenAI client: {exc}. Pass api_key=... or set "
                "OPENAI_API_KEY (for the local server any value works)"
            ) from None
        url = urlsplit(str(self._client.base_url))
        self.server_address: str | None = url.hostname
        self.server_port: int | None = url.port or (443 if url.scheme == "https" else 80)
        self.base_url = str(self._client.base_url)

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
        options: RequestOptions = {"timeout": timeout_s, "security": {"bearer_auth": True}}
        if client_request_id:
            options["headers"] = {"X-Client-Request-Id": client_request_id}
        try:
            raw = await self._client.post(
                "/responses",
                body=self._params(request, model),
                options=options,
                cast_to=httpx2.Response,
            )
        except openai.APITimeoutError:
            raise ProviderError(
                ErrorType.TIMEOUT,
                f"no answer within the request timeout of {timeout_s}s",
                retryable=True,
            ) from None
        except openai.APIConnectionError as exc:
            refused = isinstance(exc.__cause__, httpx2.ConnectError)
            raise ProviderError(
                ErrorType.CONNECTION,
                _short(f"{exc.message} ({type(exc.__cause__).__name__}: {exc.__cause__})"),
                retryable=True,
                reached_provider=not refused,
            ) from None
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body, dict) else {}
            code = error.get("code") if isinstance(error, dict) else None
            error_type, retryable = classify_status(exc.status_code, code)
            raise ProviderError(
                error_type,
                _short(f"HTTP {exc.status_code}: {exc.message}"),
                retryable=retryable,
                status=exc.status_code,
                retry_after_s=_retry_after(exc.response.headers),
                provider_code=code if isinstance(code, str) else None,
                provider_request_id=exc.request_id,
                rate_limits=_rate_limits(exc.response.headers),
            ) from None
        return self._parse(raw, request)

    def _parse(self, raw: httpx2.Response, request: GenerationRequest) -> ProviderResponse:
        headers = raw.headers
        rate_limits = _rate_limits(headers)
        request_id = headers.get("x-request-id")

        def invalid(message: str) -> ProviderError:
            return ProviderError(
                ErrorType.INVALID_RESPONSE,
                _short(message),
                retryable=False,
                status=raw.status_code,
                provider_request_id=request_id,
                rate_limits=rate_limits,
            )

        try:
            response = json.loads(raw.content)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise invalid(f"the provider's answer is not valid JSON: {exc}") from None
        if not isinstance(response, dict):
            raise invalid("the provider's answer is not a JSON object")
        usage = response.get("usage")
        if not isinstance(usage, dict):
            raise invalid("the provider's answer has no usage: cannot account for its tokens")
        try:
            text = _output_text(response.get("output"))
            cached = _count(usage.get("input_tokens_details"), "cached_tokens")
            reasoning = _count(usage.get("output_tokens_details"), "reasoning_tokens")
            input_tokens = _count(usage, "input_tokens", required=True)
            output_tokens = _count(usage, "output_tokens", required=True)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise invalid(f"the provider's answer has malformed output or usage: {exc}") from None
        content: Any = text
        if request.response_schema is not None:
            schema_name = request.response_schema.__name__
            try:
                content = request.response_schema.model_validate_json(text)
            except ValueError as exc:
                raise invalid(
                    f"the answer does not validate against {schema_name}: {exc}"
                ) from None
        status = response.get("status")
        incomplete = response.get("incomplete_details")
        if status == "incomplete" and isinstance(incomplete, dict):
            finish = [str(incomplete.get("reason") or "incomplete")]
        else:
            finish = ["stop"] if status == "completed" else [str(status)]
        response_id = response.get("id")
        response_model = response.get("model")
        return ProviderResponse(
            content=content,
            raw_content=text,
            response_id=response_id if isinstance(response_id, str) else None,
            response_model=response_model if isinstance(response_model, str) else None,
            finish_reasons=finish,
            input_tokens=input_tokens,
            cached_tokens=cached,
            output_tokens=output_tokens,
            reasoning_tokens=reasoning,
            status=raw.status_code,
            provider_request_id=request_id,
            rate_limits=rate_limits,
        )

    async def aclose(self) -> None:
        await self._client.close()
        if self._owns_http:
            await self.http_client.aclose()


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


def _count(holder: Any, key: str, *, required: bool = False) -> int:
    """A token count of the usage object: a non-negative int (0 when an optional one is absent)."""
    value = holder.get(key) if isinstance(holder, dict) else None
    if value is None:
        if required:
            raise KeyError(f"usage.{key} is missing")
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is not a token count")
    return value


def dumps_schema(schema: type[Any]) -> str:
    """The strict JSON schema the provider is sent for ``schema`` (for docs and tests)."""
    return json.dumps(type_to_text_format_param(schema))

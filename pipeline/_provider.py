"""The OpenAI Responses API provider, through the official SDK.

Invariants:
- One ``AsyncOpenAI`` client per provider, created with ``max_retries=0``: the service's
  tenacity loop is the only retry layer. It is closed with the provider.
- The model is an argument of every call; there is no shared "current model".
- Every failure becomes a classified :class:`~pipeline.typing.ProviderError`; cancellation
  passes through untouched.
- The API key never leaves the SDK client: it is not stored here, logged or put in errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from openai.lib._parsing._responses import type_to_text_format_param

from ._errors import ErrorType
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
        params = self._params(request, model)
        headers = {"X-Client-Request-Id": client_request_id} if client_request_id else None
        try:
            raw = await self._client.responses.with_raw_response.create(
                **params, timeout=timeout_s, extra_headers=headers
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
        except openai.APIResponseValidationError as exc:
            raise ProviderError(
                ErrorType.INVALID_RESPONSE,
                _short(f"the provider's answer does not match the Responses API: {exc.message}"),
                retryable=False,
                status=exc.status_code,
            ) from None
        return self._parse(raw, request)

    def _parse(self, raw: Any, request: GenerationRequest) -> ProviderResponse:
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
            response = raw.parse()
        except (ValueError, TypeError, openai.OpenAIError) as exc:
            raise invalid(f"the provider's answer is not valid JSON: {exc}") from None
        usage = getattr(response, "usage", None)
        if not isinstance(response, openai.types.responses.Response) or usage is None:
            raise invalid("the provider's answer has no usage: cannot account for its tokens")
        try:
            text = response.output_text
            input_details = usage.input_tokens_details
            output_details = usage.output_tokens_details
            cached = int(getattr(input_details, "cached_tokens", 0) or 0)
            reasoning = int(getattr(output_details, "reasoning_tokens", 0) or 0)
            input_tokens = int(usage.input_tokens)
            output_tokens = int(usage.output_tokens)
        except (AttributeError, TypeError, ValueError) as exc:
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
        if response.status == "incomplete" and response.incomplete_details is not None:
            finish = [str(response.incomplete_details.reason or "incomplete")]
        else:
            finish = ["stop"] if response.status == "completed" else [str(response.status)]
        return ProviderResponse(
            content=content,
            raw_content=text,
            response_id=response.id,
            response_model=response.model,
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


def dumps_schema(schema: type[Any]) -> str:
    """The strict JSON schema the provider is sent for ``schema`` (for docs and tests)."""
    return json.dumps(type_to_text_format_param(schema))

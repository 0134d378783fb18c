"""What the OpenAI providers (Responses and Chat Completions) share: the SDK client, the one
error classification, rate-limit headers, token counts and the streamed-answer reader.

Invariants:
- One ``AsyncOpenAI`` client per provider, created with ``max_retries=0``: the service's
  tenacity loop is the only retry layer. It is closed with the provider.
- Every failure becomes a classified :class:`~pipeline.typing.ProviderError`, by
  :func:`provider_error` alone, for both APIs and both modes; cancellation passes through.
- Requests go through the SDK's own request path (``client.post``: headers, auth, timeout,
  status errors, and for streams its SSE decoder) with ``cast_to`` the raw HTTP response or,
  for a stream, ``object`` (the SDK then yields each event's JSON as it is). The answer is
  read here, instead of into the SDK's pydantic models, for the few fields llmtrail needs.
- A stream is retryable only until its headers arrived: :meth:`OpenAIStream.__anext__`
  raises nothing retryable. Its usage, when the server sends none, is estimated by the one
  rule of :meth:`OpenAIStream.snapshot`.
- The API key never leaves the SDK client: it is not stored here, logged or put in errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from openai import AsyncStream
from openai._types import RequestOptions

from ._errors import ConfigurationError, ErrorType
from ._provider_types import ProviderError, ProviderResponse
from ._redact import redact_text
from ._send_time import attach_send_trace
from ._types import GenerationRequest

__all__ = [
    "RATE_LIMIT_HEADERS",
    "OpenAIProviderBase",
    "OpenAIStream",
    "classify_status",
    "count",
    "parse_answer",
    "Usage4",
    "rate_limits",
    "short",
    "validated",
]

RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
_MAX_MESSAGE = 500
Usage4 = tuple[int, int, int, int]  # input, cached, output, reasoning tokens


def rate_limits(headers: Mapping[str, str] | None) -> dict[str, str]:
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


def processing_s(headers: Mapping[str, str]) -> float | None:
    """The provider's ``openai-processing-ms``, in seconds (None when absent or malformed)."""
    raw = headers.get("openai-processing-ms")
    try:
        return max(float(raw) / 1000.0, 0.0) if raw else None
    except ValueError:
        return None


def short(message: str) -> str:
    # Redacted before it is cut: a secret cut in half no longer matches its pattern.
    message = redact_text(message)
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def count(holder: Any, key: str, *, required: bool = False) -> int:
    """A token count of a usage object: a non-negative int (0 when an optional one is absent)."""
    value = holder.get(key) if isinstance(holder, dict) else None
    if value is None:
        if required:
            raise KeyError(f"usage.{key} is missing")
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} is not a token count")
    return value


def provider_error(exc: openai.OpenAIError, timeout_s: float, *, streaming: bool) -> ProviderError:
    """The classified error of one SDK exception. ``streaming``: it was raised after the
    stream's headers arrived, so it is a broken stream and never retryable."""
    if isinstance(exc, openai.APITimeoutError):
        if streaming:
            return ProviderError(
                ErrorType.STREAM_BROKEN,
                f"the stream stalled: no data within the read timeout of {timeout_s}s",
                retryable=False,
                status=200,
            )
        return ProviderError(
            ErrorType.TIMEOUT,
            f"no answer within the request timeout of {timeout_s}s",
            retryable=True,
        )
    if isinstance(exc, openai.APIConnectionError):
        detail = short(f"{exc.message} ({type(exc.__cause__).__name__}: {exc.__cause__})")
        if streaming:
            return ProviderError(
                ErrorType.STREAM_BROKEN,
                f"the connection broke mid-stream: {detail}",
                retryable=False,
                status=200,
            )
        refused = isinstance(exc.__cause__, httpx2.ConnectError)
        return ProviderError(
            ErrorType.CONNECTION, detail, retryable=True, reached_provider=not refused
        )
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body, dict) else {}
        code = error.get("code") if isinstance(error, dict) else None
        said = error.get("message") if isinstance(error, dict) else None
        error_type, retryable = classify_status(exc.status_code, code)
        return ProviderError(
            error_type,
            # The provider's own message; the SDK's repeats the code and the whole body.
            short(f"HTTP {exc.status_code}: {said if isinstance(said, str) else exc.message}"),
            retryable=retryable,
            status=exc.status_code,
            retry_after_s=_retry_after(exc.response.headers),
            provider_code=code if isinstance(code, str) else None,
            provider_request_id=exc.request_id,
            rate_limits=rate_limits(exc.response.headers),
        )
    if isinstance(exc, openai.APIError):
        body = exc.body if isinstance(exc.body, dict) else {}
        code = body.get("code")
        if streaming:  # an error event inside the stream
            message = f"the server sent an error mid-stream: {exc.message}"
            error_type = ErrorType.STREAM_BROKEN
        else:  # the SDK could not read the answer
            message, error_type = exc.message, ErrorType.INVALID_RESPONSE
        return ProviderError(
            error_type,
            short(message),
            retryable=False,
            status=200,
            provider_code=code if isinstance(code, str) else None,
        )
    return ProviderError(ErrorType.INTERNAL, short(f"{type(exc).__name__}: {exc}"), retryable=False)


def validated(request: GenerationRequest, text: str) -> Any:
    """The answer's content: ``text``, or the ``response_schema`` instance it must parse into
    (a mismatch raises ValueError naming the schema)."""
    if request.response_schema is None:
        return text
    try:
        return request.response_schema.model_validate_json(text)
    except ValueError as exc:
        name = request.response_schema.__name__
        raise ValueError(f"the answer does not validate against {name}: {exc}") from None


def invalid(
    message: str, status: int, request_id: str | None, limits: dict[str, str]
) -> ProviderError:
    return ProviderError(
        ErrorType.INVALID_RESPONSE,
        short(message),
        retryable=False,
        status=status,
        provider_request_id=request_id,
        rate_limits=limits,
    )


# What an API's reader takes from an answer: (text, finish_reasons, (input, cached, output,
# reasoning) tokens). It raises AttributeError, TypeError, ValueError or KeyError on bad shapes.
AnswerReader = Callable[[dict[str, Any], dict[str, Any]], tuple[str, list[str], Usage4]]


def parse_answer(
    raw: httpx2.Response, request: GenerationRequest, read: AnswerReader
) -> ProviderResponse:
    """A plain (non-streamed) answer: its JSON read by ``read``; anything missing or mistyped
    is an ``invalid_response`` naming the problem."""
    headers = raw.headers
    limits = rate_limits(headers)
    request_id = headers.get("x-request-id")

    def bad(message: str) -> ProviderError:
        return invalid(message, raw.status_code, request_id, limits)

    try:
        answer = json.loads(raw.content)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise bad(f"the provider's answer is not valid JSON: {exc}") from None
    if not isinstance(answer, dict):
        raise bad("the provider's answer is not a JSON object")
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        raise bad("the provider's answer has no usage: cannot account for its tokens")
    try:
        text, finish, tokens = read(answer, usage)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise bad(f"the provider's answer has malformed output or usage: {exc}") from None
    try:
        content = validated(request, text)
    except ValueError as exc:
        raise bad(str(exc)) from None
    response_id, response_model = answer.get("id"), answer.get("model")
    tier = answer.get("service_tier")
    return ProviderResponse(
        content=content,
        raw_content=text,
        response_id=response_id if isinstance(response_id, str) else None,
        response_model=response_model if isinstance(response_model, str) else None,
        finish_reasons=finish,
        input_tokens=tokens[0],
        cached_tokens=tokens[1],
        output_tokens=tokens[2],
        reasoning_tokens=tokens[3],
        status=raw.status_code,
        provider_request_id=request_id,
        rate_limits=limits,
        service_tier=tier if isinstance(tier, str) else None,
        processing_s=processing_s(headers),
    )


class OpenAIProviderBase:
    """The SDK client and the request path both OpenAI providers share."""

    name = "openai"
    api = "responses"

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
            raise ConfigurationError(
                f"cannot create the OpenAI client: {exc}. Pass api_key=... or set "
                "OPENAI_API_KEY (for the local server any value works)"
            ) from None
        url = urlsplit(str(self._client.base_url))
        self.server_address: str | None = url.hostname
        self.server_port: int | None = url.port or (443 if url.scheme == "https" else 80)
        self.base_url = str(self._client.base_url)

    @staticmethod
    def _options(timeout_s: float, client_request_id: str | None) -> RequestOptions:
        options: RequestOptions = {"timeout": timeout_s, "security": {"bearer_auth": True}}
        if client_request_id:
            options["headers"] = {"X-Client-Request-Id": client_request_id}
        return options

    async def _post(
        self, path: str, body: dict[str, Any], timeout_s: float, client_request_id: str | None
    ) -> httpx2.Response:
        try:
            return await self._client.post(
                path,
                body=body,
                options=self._options(timeout_s, client_request_id),
                cast_to=httpx2.Response,
            )
        except openai.OpenAIError as exc:
            raise provider_error(exc, timeout_s, streaming=False) from None

    async def _post_stream(
        self, path: str, body: dict[str, Any], timeout_s: float, client_request_id: str | None
    ) -> AsyncStream[object]:
        """Returns once the headers of a success status arrived (the SDK raises on others)."""
        try:
            return await self._client.post(
                path,
                body=body,
                options=self._options(timeout_s, client_request_id),
                cast_to=object,
                stream=True,
                stream_cls=AsyncStream[object],
            )
        except openai.OpenAIError as exc:
            raise provider_error(exc, timeout_s, streaming=False) from None

    async def aclose(self) -> None:
        await self._client.close()
        if self._owns_http:
            await self.http_client.aclose()


class OpenAIStream:
    """A streamed answer read from the SDK's event stream; each API reads its own events
    (:meth:`_on_event`). See :class:`~pipeline.typing.ProviderStream`."""

    def __init__(
        self, events: AsyncStream[object], request: GenerationRequest, timeout_s: float
    ) -> None:
        self._events = events
        self._request = request
        self._timeout_s = timeout_s
        headers = events.response.headers
        self.status = events.response.status_code
        self.provider_request_id: str | None = headers.get("x-request-id")
        self.rate_limits = rate_limits(headers)
        self.complete = False
        self._parts: list[str] = []
        self._content: Any = None
        self._validated = False
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        self.usage: Usage4 | None = None

    def __aiter__(self) -> OpenAIStream:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                data = await self._events.__anext__()
            except StopAsyncIteration:
                self._end()
                raise
            except openai.OpenAIError as exc:
                raise provider_error(exc, self._timeout_s, streaming=True) from None
            except ValueError as exc:  # an event whose data is not JSON
                raise self._invalid(f"the stream sent an event that is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise self._invalid("the stream sent an event that is not a JSON object")
            try:
                delta = self._on_event(data)
            except (AttributeError, TypeError, ValueError, KeyError) as exc:
                raise self._invalid(f"the stream sent a malformed event: {exc}") from None
            if delta:
                self._parts.append(delta)
                return delta

    def _on_event(self, data: dict[str, Any]) -> str | None:
        """Read one event; return its text delta, if any."""
        raise NotImplementedError

    def _end(self) -> None:
        self.complete = True
        text = "".join(self._parts)
        try:
            self._content = validated(self._request, text)
            self._validated = True
        except ValueError as exc:
            raise self._invalid(str(exc)) from None

    def _invalid(self, message: str) -> ProviderError:
        return invalid(message, self.status, self.provider_request_id, self.rate_limits)

    def _usage_from(
        self, usage: Any, input_key: str, output_key: str, input_details: str, output_details: str
    ) -> None:
        if isinstance(usage, dict):
            self.usage = (
                count(usage, input_key, required=True),
                count(usage.get(input_details), "cached_tokens"),
                count(usage, output_key, required=True),
                count(usage.get(output_details), "reasoning_tokens"),
            )

    def snapshot(self, estimated_input_tokens: int) -> tuple[ProviderResponse, bool]:
        text = "".join(self._parts)
        estimated = self.usage is None
        if self.usage is None:
            usage = (estimated_input_tokens, 0, math.ceil(len(text) / 4), 0)
        else:
            usage = self.usage
        response = ProviderResponse(
            content=self._content if self._validated else text,
            raw_content=text,
            response_id=self.response_id,
            response_model=self.response_model,
            finish_reasons=list(self.finish_reasons),
            input_tokens=usage[0],
            cached_tokens=usage[1],
            output_tokens=usage[2],
            reasoning_tokens=usage[3],
            status=self.status,
            provider_request_id=self.provider_request_id,
            rate_limits=self.rate_limits,
        )
        return response, estimated

    async def aclose(self) -> None:
        await self._events.close()

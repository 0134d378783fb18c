"""OpenAIChatProvider reads chat completions as the SDK's own ``ChatCompletion`` does, and
classifies failures exactly like the Responses provider (one classification for both); both
providers' stream readers turn error events into broken streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import openai
import pytest
from pydantic import BaseModel

from llmtrail.pipeline import BaseLLMService, ConfigurationError, ErrorType, GenerationRequest
from llmtrail.pipeline._chat_provider import OpenAIChatProvider
from llmtrail.pipeline._provider import OpenAIResponsesProvider
from llmtrail.pipeline._provider_types import ProviderError, ProviderResponse
from tests.conftest import RecordingSink


class City(BaseModel):
    name: str
    population: int


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(user_prompt="Say hi", max_output_tokens=64),
        GenerationRequest(user_prompt="Write a long story " * 20, max_output_tokens=16),
        GenerationRequest(
            input=[{"role": "user", "content": "Which city?"}],
            system_prompt="Answer briefly",
            response_schema=City,
        ),
        GenerationRequest(user_prompt="Think", reasoning_effort="high", max_output_tokens=400),
    ],
    ids=["plain", "length", "schema", "reasoning"],
)
async def test_chat_answers_read_as_the_sdk_reads_them(
    mock_server: Any, request_: GenerationRequest
) -> None:
    provider = OpenAIChatProvider(api_key="k", base_url=f"{mock_server.url}/v1")
    sdk = openai.AsyncOpenAI(api_key="k", base_url=f"{mock_server.url}/v1", max_retries=0)
    try:
        answer = await provider.invoke(request_, model="o3-mini", timeout_s=10)
        completion = await sdk.chat.completions.create(**provider._params(request_, "o3-mini"))
    finally:
        await provider.aclose()
        await sdk.close()
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.completion_tokens_details is not None
    choice = completion.choices[0]
    assert answer.raw_content == choice.message.content
    assert answer.finish_reasons == [choice.finish_reason]
    assert answer.response_model == completion.model
    assert (answer.input_tokens, answer.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert answer.cached_tokens == usage.prompt_tokens_details.cached_tokens
    assert answer.reasoning_tokens == usage.completion_tokens_details.reasoning_tokens
    assert answer.rate_limits["x-ratelimit-limit-requests"]
    if request_.response_schema is not None:
        assert answer.content == City.model_validate_json(choice.message.content or "")
    record = mock_server.log[0]
    assert record.api == "chat" and record.output_tokens == answer.output_tokens


async def test_chat_and_responses_bill_the_same_conversation_the_same(mock_server: Any) -> None:
    request = GenerationRequest(user_prompt="Name a river", system_prompt="Be brief")
    answers = []
    for provider in (
        OpenAIChatProvider(api_key="k", base_url=f"{mock_server.url}/v1"),
        OpenAIResponsesProvider(api_key="k", base_url=f"{mock_server.url}/v1"),
    ):
        try:
            answers.append(await provider.invoke(request, model="gpt-4o-mini", timeout_s=10))
        finally:
            await provider.aclose()
    chat, responses = answers
    assert chat.raw_content == responses.raw_content
    assert (chat.input_tokens, chat.output_tokens) == (
        responses.input_tokens,
        responses.output_tokens,
    )


def _answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    """``body`` answered over a real SDK client whose transport serves it (no server)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.Response(
            status, content=content, headers={"x-request-id": "req_1", **(headers or {})}
        )

    async def run() -> ProviderResponse | ProviderError:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        provider = OpenAIChatProvider(
            api_key="k", base_url="http://127.0.0.1:9/v1", http_client=client
        )
        try:
            return await provider.invoke(
                GenerationRequest(user_prompt="hi"), model="m", timeout_s=5
            )
        except ProviderError as exc:
            return exc
        finally:
            await provider.aclose()
            await client.aclose()

    return asyncio.run(run())


_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 20},
}


def _completion(**extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "o3-mini-2025-01-31",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
        **extra,
    }


def test_cached_and_reasoning_tokens_are_read_from_their_details() -> None:
    answer = _answer(_completion())
    assert isinstance(answer, ProviderResponse)
    assert (answer.input_tokens, answer.cached_tokens) == (12, 4)
    assert (answer.output_tokens, answer.reasoning_tokens) == (30, 20)
    assert answer.content == "Hello" and answer.response_id == "chatcmpl-1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (_completion(usage=None), "has no usage"),
        (_completion(choices=[]), "choices is empty"),
        (_completion(usage={"completion_tokens": 3}), "usage.prompt_tokens is missing"),
        (
            _completion(choices=[{"index": 0, "message": {"content": 5}, "finish_reason": "stop"}]),
            "message.content is a int",
        ),
    ],
    ids=["bad-json", "no-usage", "no-choices", "missing-prompt-tokens", "content-not-text"],
)
def test_a_malformed_chat_answer_is_an_invalid_response_naming_what_is_wrong(
    body: Any, message: str
) -> None:
    error = _answer(body)
    assert isinstance(error, ProviderError)
    assert error.error_type is ErrorType.INVALID_RESPONSE and message in error.message
    assert not error.retryable and error.provider_request_id == "req_1"


@pytest.mark.parametrize(
    ("status", "code", "error_type", "retryable"),
    [
        (429, "rate_limit_exceeded", ErrorType.RATE_LIMITED, True),
        (429, "insufficient_quota", ErrorType.QUOTA_EXCEEDED, False),
        (503, None, ErrorType.SERVER_ERROR, True),
        (401, "invalid_api_key", ErrorType.AUTH, False),
        (400, None, ErrorType.BAD_REQUEST, False),
    ],
)
def test_status_errors_are_classified_like_the_responses_provider(
    status: int, code: str | None, error_type: ErrorType, retryable: bool
) -> None:
    body = {"error": {"message": "no", "type": "x", "param": None, "code": code}}
    error = _answer(body, status, {"retry-after-ms": "250", "x-ratelimit-limit-requests": "9"})
    assert isinstance(error, ProviderError)
    assert (error.error_type, error.retryable, error.status) == (error_type, retryable, status)
    assert error.retry_after_s == 0.25
    assert error.rate_limits == {"x-ratelimit-limit-requests": "9"}


async def test_previous_response_id_is_refused_before_anything_is_sent(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with BaseLLMService(
        base_url=f"{mock_server.url}/v1",
        api_key="k",
        provider="openai-chat",
        store_url=None,
        tracing=False,
        sinks=[recorder],
    ) as service:
        result = await service.execute_generation_async(
            GenerationRequest(user_prompt="more", previous_response_id="resp_1")
        )
    assert not result.success and result.error_type is ErrorType.VALIDATION
    assert "Responses API feature" in (result.error_message or "")
    assert mock_server.log == []


async def test_max_tokens_param_names_the_field_older_servers_know(mock_server: Any) -> None:
    provider = OpenAIChatProvider(
        api_key="k", base_url=f"{mock_server.url}/v1", max_tokens_param="max_tokens"
    )
    try:
        params = provider._params(GenerationRequest(user_prompt="hi", max_output_tokens=20), "m")
        answer = await provider.invoke(
            GenerationRequest(user_prompt="Write a long story " * 20, max_output_tokens=16),
            model="m",
            timeout_s=10,
        )
    finally:
        await provider.aclose()
    assert params["max_tokens"] == 20 and "max_completion_tokens" not in params
    assert answer.output_tokens == 16 and answer.finish_reasons == ["length"]


def test_an_unknown_provider_name_is_a_configuration_error_naming_the_choices() -> None:
    with pytest.raises(ConfigurationError, match="openai-chat"):
        BaseLLMService(provider="anthropic", api_key="k", store_url=None, tracing=False)
    with pytest.raises(ConfigurationError, match="max_tokens_param"):
        OpenAIChatProvider(api_key="k", max_tokens_param="tokens")  # type: ignore[arg-type]


def _stream(
    sse: bytes, provider_class: Any = OpenAIChatProvider
) -> tuple[list[str], ProviderError | None, Any]:
    """Stream ``sse`` over a real SDK client whose transport serves it: (deltas, error,
    snapshot of the answer)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "text/event-stream", "x-request-id": "req_2"}
        return httpx2.Response(200, content=sse, headers=headers)

    async def run() -> tuple[list[str], ProviderError | None, Any]:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        provider = provider_class(api_key="k", base_url="http://127.0.0.1:9/v1", http_client=client)
        deltas: list[str] = []
        error = None
        try:
            stream = await provider.open_stream(
                GenerationRequest(user_prompt="hi"), model="m", timeout_s=5
            )
            try:
                async for delta in stream:
                    deltas.append(delta)
            except ProviderError as exc:
                error = exc
            return deltas, error, stream.snapshot(7)
        finally:
            await provider.aclose()
            await client.aclose()

    return asyncio.run(run())


def _chunk(content: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    body = {"id": "chatcmpl-9", "model": "m-1", "choices": [choice], **extra}
    return f"data: {json.dumps(body)}\n\n".encode()


def test_an_error_event_mid_stream_is_a_broken_stream_after_the_text_before_it() -> None:
    error_event = b'data: {"error": {"message": "overloaded", "code": "server_error"}}\n\n'
    deltas, error, (answer, estimated) = _stream(_chunk("Hel") + _chunk("lo") + error_event)
    assert deltas == ["Hel", "lo"]
    assert error is not None and error.error_type is ErrorType.STREAM_BROKEN
    assert not error.retryable and "overloaded" in error.message
    assert estimated and (answer.input_tokens, answer.output_tokens) == (7, 2)
    assert answer.raw_content == "Hello" and answer.response_id == "chatcmpl-9"


def test_a_stream_reads_usage_from_its_last_chunk_and_its_finish_reason() -> None:
    usage = {**_USAGE, "completion_tokens": 3}
    last = f"data: {json.dumps({'id': 'chatcmpl-9', 'choices': [], 'usage': usage})}\n\n"
    choice = {"index": 0, "delta": {}, "finish_reason": "length"}
    finish = f"data: {json.dumps({'id': 'chatcmpl-9', 'choices': [choice]})}\n\n".encode()
    sse = _chunk("Hi") + finish + last.encode() + b"data: [DONE]\n\n"
    deltas, error, (answer, estimated) = _stream(sse)
    assert deltas == ["Hi"] and error is None and not estimated
    assert (answer.input_tokens, answer.cached_tokens) == (12, 4)
    assert (answer.output_tokens, answer.reasoning_tokens) == (3, 20)
    assert answer.finish_reasons == ["length"] and answer.content == "Hi"


def test_a_malformed_chunk_is_an_invalid_response() -> None:
    deltas, error, _ = _stream(_chunk("a") + b'data: {"choices": 5}\n\n')
    assert deltas == ["a"]
    assert error is not None and error.error_type is ErrorType.INVALID_RESPONSE
    assert "choices is a int" in error.message


@pytest.mark.parametrize("kind", ["error", "response.failed"])
def test_a_responses_stream_error_event_is_a_broken_stream(kind: str) -> None:
    def event(data: dict[str, Any]) -> bytes:
        return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()

    error = {"code": "server_error", "message": "overloaded"}
    failure = (
        {"type": kind, **error} if kind == "error" else {"type": kind, "response": {"error": error}}
    )
    delta = {"type": "response.output_text.delta", "delta": "Hi", "item_id": "m", "output_index": 0}
    deltas, caught, (answer, estimated) = _stream(
        event(delta) + event(failure), OpenAIResponsesProvider
    )
    assert deltas == ["Hi"] and estimated and answer.output_tokens == 1
    assert caught is not None and caught.error_type is ErrorType.STREAM_BROKEN
    assert caught.provider_code == "server_error" and "overloaded" in caught.message

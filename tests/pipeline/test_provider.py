"""OpenAIResponsesProvider reads answers exactly as the SDK's own ``Response`` model does.

The provider sends through the SDK's request path but reads the JSON itself (see its module
docstring); these tests hold its reading equal to ``openai.types.responses.Response`` on the
answers of the local server and on answer shapes the local server does not produce.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response
from pydantic import BaseModel

from llmtrail.pipeline import ErrorType, GenerationRequest
from llmtrail.pipeline._provider import OpenAIResponsesProvider
from llmtrail.pipeline._provider_types import ProviderError, ProviderResponse

MODEL = "gpt-4o-mini"


class City(BaseModel):
    name: str
    population: int


def _as_sdk_reads_it(response: Response) -> dict[str, Any]:
    usage = response.usage
    assert usage is not None
    return {
        "text": response.output_text,
        "response_id": response.id,
        "response_model": response.model,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.input_tokens_details.cached_tokens,
        "reasoning_tokens": usage.output_tokens_details.reasoning_tokens,
        "status": response.status,
    }


def _as_provider_reads_it(answer: ProviderResponse, status: str | None) -> dict[str, Any]:
    return {
        "text": answer.raw_content,
        "response_id": answer.response_id,
        "response_model": answer.response_model,
        "input_tokens": answer.input_tokens,
        "output_tokens": answer.output_tokens,
        "cached_tokens": answer.cached_tokens,
        "reasoning_tokens": answer.reasoning_tokens,
        "status": status,
    }


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
    ids=["plain", "incomplete", "schema", "reasoning"],
)
async def test_answers_of_the_local_server_read_as_the_sdk_reads_them(
    mock_server: Any, request_: GenerationRequest
) -> None:
    provider = OpenAIResponsesProvider(api_key="k", base_url=f"{mock_server.url}/v1")
    try:
        answer = await provider.invoke(request_, model="o3-mini", timeout_s=10)
        # The same server answer, read by the SDK: fetch it again through responses.create.
        # The local server's answers are a pure function of the request but for the ids.
        sdk = openai.AsyncOpenAI(api_key="k", base_url=f"{mock_server.url}/v1", max_retries=0)
        try:
            params = provider._params(request_, "o3-mini")
            response = await sdk.responses.create(**params)
        finally:
            await sdk.close()
    finally:
        await provider.aclose()
    expected = _as_sdk_reads_it(response)
    expected["response_id"] = answer.response_id  # ids are random per answer
    status = "incomplete" if answer.finish_reasons == ["max_output_tokens"] else "completed"
    assert _as_provider_reads_it(answer, status) == expected
    if request_.response_schema is not None:
        assert answer.content == City.model_validate_json(response.output_text)
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert answer.finish_reasons == [response.incomplete_details.reason]


def _answer(body: Any, status: int = 200) -> ProviderResponse | ProviderError:
    """``body`` answered over a real SDK client whose transport serves it (no server)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.Response(status, content=content, headers={"x-request-id": "req_1"})

    async def run() -> ProviderResponse | ProviderError:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        provider = OpenAIResponsesProvider(
            api_key="k", base_url="http://127.0.0.1:9/v1", http_client=client
        )
        try:
            return await provider.invoke(
                GenerationRequest(user_prompt="hi"), model=MODEL, timeout_s=5
            )
        except ProviderError as exc:
            return exc
        finally:
            await provider.aclose()
            await client.aclose()

    return asyncio.run(run())


_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 42,
}


def _response(output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "o3-mini-2025-01-31",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _USAGE,
        **extra,
    }


def _message(*parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": list(parts),
    }


def _text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


@pytest.mark.parametrize(
    "output",
    [
        [_message(_text("Hello"))],
        [
            {"id": "rs_1", "type": "reasoning", "summary": []},
            _message(_text("Hel"), _text("lo")),
        ],
        [_message({"type": "refusal", "refusal": "no"})],
        [
            {
                "id": "fc_1",
                "type": "function_call",
                "call_id": "c1",
                "name": "f",
                "arguments": "{}",
            },
            _message(_text("a")),
            _message(_text("b")),
        ],
        [],
    ],
    ids=["one-part", "reasoning-then-two-parts", "refusal", "tool-call-then-two-messages", "none"],
)
def test_output_text_joins_the_same_parts_as_the_sdk(output: list[dict[str, Any]]) -> None:
    body = _response(output)
    answer = _answer(body)
    assert isinstance(answer, ProviderResponse)
    sdk = Response.model_validate(body)
    assert answer.raw_content == sdk.output_text
    assert (answer.input_tokens, answer.cached_tokens) == (12, 4)
    assert (answer.output_tokens, answer.reasoning_tokens) == (30, 20)
    assert answer.response_model == "o3-mini-2025-01-31"
    assert answer.provider_request_id == "req_1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ([1, 2], "not a JSON object"),
        ({k: v for k, v in _response([]).items() if k != "usage"}, "has no usage"),
        (_response([], usage={"output_tokens": 3}), "usage.input_tokens is missing"),
        (_response([], usage={**_USAGE, "output_tokens": "30"}), "is not a token count"),
        (_response([], usage={**_USAGE, "input_tokens": -1}), "is not a token count"),
        (_response({"type": "message"}), "malformed output"),  # type: ignore[arg-type]
        (_response([_message({"type": "output_text", "text": None})]), "malformed output"),
    ],
    ids=[
        "bad-json",
        "bad-utf8",
        "array",
        "no-usage",
        "missing-input-tokens",
        "string-count",
        "negative-count",
        "output-not-a-list",
        "text-not-a-string",
    ],
)
def test_a_malformed_answer_is_an_invalid_response_naming_what_is_wrong(
    body: Any, message: str
) -> None:
    error = _answer(body)
    assert isinstance(error, ProviderError)
    assert error.error_type is ErrorType.INVALID_RESPONSE
    assert message in error.message
    assert error.status == 200 and not error.retryable
    assert error.provider_request_id == "req_1"

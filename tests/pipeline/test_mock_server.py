"""The local OpenAI-compatible server, seen through the real openai SDK over loopback."""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from llmtrail.testing._mock_server import (
    MockServer,
    MockServerConfig,
    add_arguments,
    format_duration,
    max_arrivals_in_window,
    run_from_args,
    running_in_process,
    running_in_thread,
)
from llmtrail.testing.fixtures import MockServerFactory

PROMPT = "Summarise the quarterly report in two sentences."
INSTRUCTIONS = "You are a terse assistant."


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_for(server: MockServer | str, **kwargs: object) -> AsyncOpenAI:
    url = server if isinstance(server, str) else server.url
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def client(mock_server: MockServer) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(mock_server) as c:
        yield c


# ---------------------------------------------------------------- usage model


async def test_usage_is_deterministic_and_input_is_ceil_chars_over_4(client: AsyncOpenAI) -> None:
    first = await client.responses.create(
        model="gpt-4o-mini", instructions=INSTRUCTIONS, input=PROMPT
    )
    second = await client.responses.create(
        model="gpt-4o-mini", instructions=INSTRUCTIONS, input=PROMPT
    )

    assert first.id.startswith("resp_") and first.id != second.id
    assert first.object == "response" and first.status == "completed"
    assert first.usage is not None and second.usage is not None
    assert first.usage.input_tokens == math.ceil(len(INSTRUCTIONS + PROMPT) / 4)
    assert 20 <= first.usage.output_tokens <= 60
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert first.usage.output_tokens_details.reasoning_tokens == 0
    assert len(first.output_text) == 4 * first.usage.output_tokens
    assert (second.usage, second.output_text) == (first.usage, first.output_text)


async def test_message_list_input_counts_every_text_part(client: AsyncOpenAI) -> None:
    texts = ["first message here", "a reply", "and the second part"]
    response = await client.responses.create(
        model="gpt-4o-mini",
        input=[
            {"role": "user", "content": texts[0]},
            {"role": "assistant", "content": texts[1]},
            {"role": "user", "content": [{"type": "input_text", "text": texts[2]}]},
        ],
    )
    assert response.usage is not None
    assert response.usage.input_tokens == math.ceil(len("".join(texts)) / 4)


async def test_output_tokens_follow_the_configured_range(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(output_tokens_min=7, output_tokens_max=7)
    async with client_for(server) as c:
        for prompt in ("a", "b", "c"):
            response = await c.responses.create(model="m", input=prompt)
            assert response.usage is not None and response.usage.output_tokens == 7


async def test_reasoning_tokens_are_a_share_of_output_tokens(client: AsyncOpenAI) -> None:
    plain = await client.responses.create(model="o4-mini", input=PROMPT)
    reasoning = await client.responses.create(
        model="o4-mini", input=PROMPT, reasoning={"effort": "medium"}
    )
    assert plain.usage is not None and reasoning.usage is not None
    assert reasoning.usage.output_tokens == plain.usage.output_tokens
    assert reasoning.usage.output_tokens_details.reasoning_tokens == plain.usage.output_tokens // 2
    visible = reasoning.usage.output_tokens - reasoning.usage.output_tokens_details.reasoning_tokens
    assert len(reasoning.output_text) == 4 * visible
    assert reasoning.reasoning is not None and reasoning.reasoning.effort == "medium"


async def test_max_output_tokens_caps_output_and_marks_incomplete(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(output_tokens_min=100, output_tokens_max=100)
    async with client_for(server) as c:
        response = await c.responses.create(model="m", input=PROMPT, max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 16
    assert len(response.output_text) == 64
    assert response.max_output_tokens == 16


async def test_max_output_tokens_under_16_is_a_400_like_the_real_api(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="m", input=PROMPT, max_output_tokens=5)
    assert caught.value.code == "integer_below_min_value"
    assert caught.value.param == "max_output_tokens"


async def test_repeated_long_prompt_reports_cached_prefix_in_multiples_of_128(
    client: AsyncOpenAI,
) -> None:
    long_prompt = "".join(f"line {i:05d} of the shared document. " for i in range(160))  # 5280
    assert len(long_prompt) >= 4096
    first = await client.responses.create(model="m", input=long_prompt)
    again = await client.responses.create(model="m", input=long_prompt)
    extended = await client.responses.create(model="m", input=long_prompt + "x" * 2000)
    short = await client.responses.create(model="m", input=PROMPT)
    short_again = await client.responses.create(model="m", input=PROMPT)

    assert first.usage is not None and again.usage is not None and extended.usage is not None
    input_tokens = math.ceil(len(long_prompt) / 4)
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert again.usage.input_tokens == input_tokens
    assert again.usage.input_tokens_details.cached_tokens == input_tokens // 128 * 128
    assert extended.usage.input_tokens_details.cached_tokens == len(long_prompt) // 512 * 128
    assert again.usage.input_tokens_details.cache_write_tokens == 0
    assert short_again.usage is not None and short.usage is not None
    assert short_again.usage.input_tokens_details.cached_tokens == 0  # below 1024 tokens


# ---------------------------------------------------------------- streaming


async def test_stream_sends_the_real_event_sequence(client: AsyncOpenAI) -> None:
    expected = await client.responses.create(model="gpt-4o-mini", input=PROMPT)
    stream = await client.responses.create(model="gpt-4o-mini", input=PROMPT, stream=True)
    events = [event async for event in stream]

    types = [event.type for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1]
    assert final.type == "response.completed"
    assert deltas == final.response.output_text == expected.output_text
    assert final.response.usage == expected.usage
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"


async def test_stream_helper_accumulates_the_final_response(client: AsyncOpenAI) -> None:
    async with client.responses.stream(model="gpt-4o-mini", input=PROMPT) as stream:
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.usage is not None
    assert len(final.output_text) == 4 * final.usage.output_tokens


async def test_capped_stream_ends_with_response_incomplete(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(output_tokens_min=80, output_tokens_max=80)
    async with client_for(server) as c:
        stream = await c.responses.create(
            model="m", input=PROMPT, max_output_tokens=20, stream=True
        )
        events = [event async for event in stream]
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.status == "incomplete"
    assert final.response.usage is not None and final.response.usage.output_tokens == 20


# ---------------------------------------------------------------- structured output


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    age: int
    height_m: float
    active: bool
    colour: Colour
    home: Address
    previous: list[Address]
    nickname: str | None


class Constrained(BaseModel):
    code: str = Field(min_length=8, max_length=10)
    count: int = Field(ge=3, le=9)
    ratio: float = Field(gt=1.5)
    items: list[int] = Field(min_length=2)


async def test_structured_output_parses_into_the_pydantic_model(client: AsyncOpenAI) -> None:
    response = await client.responses.parse(model="gpt-4o-mini", input=PROMPT, text_format=Person)
    parsed = response.output_parsed
    assert isinstance(parsed, Person)
    assert parsed.colour is Colour.RED
    assert Person.model_validate_json(response.output_text) == parsed
    assert response.usage is not None
    assert response.usage.output_tokens == math.ceil(len(response.output_text) / 4)


async def test_structured_output_honours_schema_constraints(client: AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="gpt-4o-mini",
        input=PROMPT,
        text={
            "format": {
                "type": "json_schema",
                "name": "constrained",
                "schema": Constrained.model_json_schema(),
                "strict": False,
            }
        },
    )
    Constrained.model_validate_json(response.output_text)


# ---------------------------------------------------------------- rate limits


async def test_rpm_limit_answers_429_with_openai_body_and_headers(
    mock_server_factory: MockServerFactory,
) -> None:
    clock = FakeClock()
    server = await mock_server_factory(clock=clock, rpm_limit=120, window_s=1.0)  # 2 per window
    async with client_for(server) as c:
        ok = await c.responses.with_raw_response.create(model="gpt-4o-mini", input=PROMPT)
        assert ok.headers["x-ratelimit-limit-requests"] == "120"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-reset-requests"] == "1s"
        await c.responses.create(model="gpt-4o-mini", input=PROMPT)
        clock.now += 0.25
        with pytest.raises(openai.RateLimitError) as caught:
            await c.responses.create(model="gpt-4o-mini", input=PROMPT)

    error = caught.value
    assert error.status_code == 429
    assert error.body == {
        "message": (
            "Rate limit reached for gpt-4o-mini in organization org-mock on requests per min "
            "(RPM): Limit 120, Used 2, Requested 1. Please try again in 750ms. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        ),
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    headers = error.response.headers
    assert headers["retry-after-ms"] == "750"
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "750ms"
    assert headers["x-request-id"].startswith("req_")
    assert [r.counted for r in server.log] == [True, True, False]


async def test_window_frees_when_the_oldest_arrival_leaves(
    mock_server_factory: MockServerFactory,
) -> None:
    clock = FakeClock()
    server = await mock_server_factory(clock=clock, rpm_limit=120, window_s=1.0)
    async with client_for(server) as c:
        await c.responses.create(model="m", input=PROMPT)
        clock.now += 0.5
        await c.responses.create(model="m", input=PROMPT)
        clock.now += 0.4
        for _ in range(3):  # rejected arrivals do not extend the wait
            with pytest.raises(openai.RateLimitError) as caught:
                await c.responses.create(model="m", input=PROMPT)
            assert caught.value.response.headers["retry-after-ms"] == "100"
        clock.now += 0.1  # the first arrival leaves the window exactly now
        freed = await c.responses.with_raw_response.create(model="m", input=PROMPT)
        with pytest.raises(openai.RateLimitError):
            await c.responses.create(model="m", input=PROMPT)
    assert freed.headers["x-ratelimit-remaining-requests"] == "0"
    assert server.arrivals_in_any_window(1.0, counted_only=True) == 2


async def test_concurrent_arrivals_never_take_more_than_the_window_holds(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(clock=FakeClock(), rpm_limit=240, window_s=1.0)  # 4

    async def post(http: aiohttp.ClientSession) -> int:
        async with http.post(f"{server.url}/v1/responses", json={"model": "m", "input": "x"}) as r:
            return r.status

    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(post(http) for _ in range(20)))
    assert sorted(statuses) == [200] * 4 + [429] * 16
    assert server.arrivals_in_any_window(1.0, counted_only=True) == 4
    assert server.arrivals_in_any_window(1.0) == 20


async def test_tpm_limit_charges_input_plus_max_output_at_arrival(
    mock_server_factory: MockServerFactory,
) -> None:
    clock = FakeClock()
    server = await mock_server_factory(clock=clock, tpm_limit=6000, window_s=1.0)  # 100 tokens
    charge = math.ceil(len(PROMPT) / 4) + 60
    async with client_for(server) as c:
        ok = await c.responses.with_raw_response.create(
            model="m", input=PROMPT, max_output_tokens=60
        )
        assert ok.headers["x-ratelimit-remaining-tokens"] == str(100 - charge)
        with pytest.raises(openai.RateLimitError) as caught:
            await c.responses.create(model="m", input=PROMPT, max_output_tokens=60)
        with pytest.raises(openai.RateLimitError) as too_large:
            await c.responses.create(model="m", input=PROMPT, max_output_tokens=500)
    assert caught.value.body["type"] == "tokens"  # type: ignore[index]
    assert f"(TPM): Limit 6000, Used {charge}, Requested {charge}." in caught.value.message
    assert caught.value.response.headers["retry-after-ms"] == "1000"
    assert "Request too large for m" in too_large.value.message
    assert "retry-after-ms" not in too_large.value.response.headers


async def test_exhausted_token_quota_answers_insufficient_quota(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(token_quota=1)
    async with client_for(server) as c:
        await c.responses.create(model="m", input=PROMPT)  # starts under the quota
        with pytest.raises(openai.RateLimitError) as caught:
            await c.responses.create(model="m", input=PROMPT)
    assert caught.value.code == "insufficient_quota"
    assert caught.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert "retry-after-ms" not in caught.value.response.headers
    assert [r.error_type for r in server.log] == [None, "insufficient_quota"]


async def test_every_answer_carries_request_id_and_six_rate_limit_headers(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(
        require_api_key="sk-test", rpm_limit=60, fault_script=("none", "http_500")
    )
    names = [
        f"x-ratelimit-{kind}-{unit}"
        for kind in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    ]
    good = {"Authorization": "Bearer sk-test"}
    body = {"model": "m", "input": PROMPT}
    async with aiohttp.ClientSession() as http:
        answers = [
            await http.post(f"{server.url}/v1/responses", json=body, headers=good),  # 200
            await http.post(f"{server.url}/v1/responses", json=body, headers=good),  # 500
            await http.post(f"{server.url}/v1/responses", data=b"{not json", headers=good),
            await http.post(f"{server.url}/v1/responses", json=body),  # 401
            await http.get(f"{server.url}/_mock/log"),
            await http.get(f"{server.url}/nowhere"),
        ]
        for answer in answers:
            answer.release()
    assert [a.status for a in answers] == [200, 500, 400, 401, 200, 404]
    for answer in answers:
        assert answer.headers["x-request-id"].startswith("req_")
        assert all(name in answer.headers for name in names), answer.headers


async def test_unlimited_server_reports_a_large_limit(client: AsyncOpenAI) -> None:
    raw = await client.responses.with_raw_response.create(model="m", input=PROMPT)
    assert int(raw.headers["x-ratelimit-limit-requests"]) >= 10**9
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 10**8
    assert raw.headers["x-ratelimit-reset-tokens"] == "1m0s"


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("http_500", openai.InternalServerError, 500),
        ("http_503", openai.InternalServerError, 503),
        ("rate_limit_429", openai.RateLimitError, 429),
        ("drop", openai.APIConnectionError, None),
        ("hang", openai.APITimeoutError, None),
        ("slow", openai.APITimeoutError, None),
        ("malformed_json", json.JSONDecodeError, 200),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_fault_as_the_sdk_sees_it(
    mock_server_factory: MockServerFactory,
    fault: str,
    error: type[Exception],
    status: int | None,
    stream: bool,
) -> None:
    server = await mock_server_factory(fault_script=(fault,), slow_s=30.0)
    async with client_for(server, timeout=0.3) as c:
        with pytest.raises(error) as caught:
            if stream:
                async for _ in await c.responses.create(model="m", input=PROMPT, stream=True):
                    pass
            else:
                await c.responses.create(model="m", input=PROMPT)
        after = await c.responses.create(model="m", input=PROMPT)  # the script is over
    assert after.status == "completed"
    assert server.log[0].fault == fault and server.log[1].fault is None
    if status is not None and not (stream and fault == "slow"):
        assert server.log[0].status == status
    if isinstance(caught.value, openai.APIStatusError):
        assert caught.value.status_code == status
        assert caught.value.body["type"] == (  # type: ignore[index]
            "requests" if status == 429 else "server_error"
        )
    if fault == "rate_limit_429":
        assert isinstance(caught.value, openai.RateLimitError)
        assert caught.value.response.headers["retry-after-ms"] == "100"
        assert not server.log[0].counted


async def test_missing_usage_fault_returns_valid_json_without_usage(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(fault_script=("missing_usage", "missing_usage"))
    async with client_for(server) as c:
        response = await c.responses.create(model="m", input=PROMPT)
        stream = await c.responses.create(model="m", input=PROMPT, stream=True)
        events = [event async for event in stream]
    assert response.usage is None and response.output_text
    assert events[-1].type == "response.completed" and events[-1].response.usage is None


async def test_malformed_fault_breaks_the_stream_too(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(fault_script=("malformed_json",))
    async with client_for(server) as c:
        stream = await c.responses.create(model="m", input=PROMPT, stream=True)
        with pytest.raises(json.JSONDecodeError):
            async for _ in stream:
                pass


async def test_latency_delays_the_answer_past_a_short_timeout(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(latency_s=30.0)
    async with client_for(server, timeout=0.2) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.responses.create(model="m", input=PROMPT)


async def _fault_sequence(server: MockServer, count: int) -> list[str | None]:
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            async with http.post(
                f"{server.url}/v1/responses", json={"model": "m", "input": "x"}
            ) as r:
                await r.read()
    return [record.fault for record in server.log]


async def test_fault_rates_are_deterministic_for_a_seed(
    mock_server_factory: MockServerFactory,
) -> None:
    rates = {"fault_500_rate": 0.3, "fault_503_rate": 0.2, "fault_no_usage_rate": 0.2}
    one = await _fault_sequence(await mock_server_factory(seed=7, **rates), 40)
    two = await _fault_sequence(await mock_server_factory(seed=7, **rates), 40)
    other = await _fault_sequence(await mock_server_factory(seed=8, **rates), 40)
    assert one == two
    assert one != other
    assert {"http_500", "http_503", "missing_usage", None} == set(one)


# ---------------------------------------------------------------- log, control, auth


async def test_log_records_each_arrival_without_the_authorization_value(
    mock_server_factory: MockServerFactory,
) -> None:
    clock = FakeClock()
    server = await mock_server_factory(clock=clock, rpm_limit=60, window_s=1.0)  # 1 per window
    async with client_for(server) as c:
        await c.responses.create(
            model="gpt-4o-mini", input=PROMPT, extra_headers={"x-client-request-id": "call-1"}
        )
        with pytest.raises(openai.RateLimitError):
            await c.responses.create(model="gpt-4o-mini", input=PROMPT)
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/_mock/log") as answer:
        over_http = await answer.json()

    first, second = server.log
    assert first.client_request_id == "call-1" and second.client_request_id is None
    assert first.authorization_present and first.model == "gpt-4o-mini"
    assert (first.status, first.counted, first.fault) == (200, True, None)
    assert first.input_tokens == math.ceil(len(PROMPT) / 4) and first.output_tokens > 0
    assert (second.status, second.counted, second.error_type) == (429, False, "requests")
    assert first.arrival_monotonic == 1000.0 and first.arrival_wall > 1.7e9
    assert over_http["records"] == [first.to_dict(), second.to_dict()]
    assert "sk-test" not in json.dumps(over_http)


async def test_control_endpoints_read_change_and_reset(mock_server: MockServer) -> None:
    base = mock_server.url
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/responses", json={"model": "m", "input": "x"}) as r:
            assert r.status == 200
        async with http.post(f"{base}/_mock/config", json={"rpm_limit": 600, "window_s": 1}) as r:
            assert r.status == 200
            assert (await r.json())["rpm_limit"] == 600
        async with http.get(f"{base}/_mock/config") as r:
            assert (await r.json())["window_s"] == 1
        async with http.post(f"{base}/_mock/config", json={"latency_s": -1}) as r:
            assert r.status == 400
            assert "latency_s" in (await r.json())["error"]["message"]
        async with http.post(f"{base}/_mock/config", json={"no_such_field": 1}) as r:
            assert r.status == 400
            assert "no_such_field" in (await r.json())["error"]["message"]
        assert len(mock_server.log) == 1
        async with http.post(f"{base}/_mock/reset") as r:
            assert r.status == 200
        async with http.get(f"{base}/_mock/log") as r:
            assert (await r.json())["records"] == []
    assert mock_server.config.rpm_limit == 600 and mock_server.config.latency_s == 0.0


async def test_required_api_key_rejects_other_bearers_with_401(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(require_api_key="sk-right")
    async with client_for(server) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.responses.create(model="m", input=PROMPT)
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-right", max_retries=0) as right:
        await right.responses.create(model="m", input=PROMPT)
    assert caught.value.code == "invalid_api_key"
    assert [(r.status, r.counted) for r in server.log] == [(401, False), (200, True)]


async def test_arrivals_in_any_window_counts_half_open_windows(
    mock_server_factory: MockServerFactory,
) -> None:
    clock = FakeClock()
    server = await mock_server_factory(clock=clock)
    async with client_for(server) as c:
        for step in (0.0, 0.5, 0.4, 0.1, 0.5):  # arrivals at 0, .5, .9, 1.0, 1.5
            clock.now += step
            await c.responses.create(model="m", input=PROMPT)
    assert server.arrivals_in_any_window(1.0) == 3
    assert server.arrivals_in_any_window(0.1) == 1
    assert server.arrivals_in_any_window(0.11) == 2
    assert server.arrivals_in_any_window(10.0) == 5


# ---------------------------------------------------------------- config, CLI, child process


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"latency_s": -0.1}, "latency_s"),
        ({"output_tokens_min": 0}, "output_tokens_min"),
        ({"output_tokens_min": 10, "output_tokens_max": 5}, "output_tokens_max"),
        ({"rpm_limit": 30, "window_s": 1.0}, "rpm_limit"),
        ({"window_s": 0}, "window_s"),
        ({"fault_500_rate": 1.5}, "fault_500_rate"),
        ({"fault_500_rate": 0.6, "fault_503_rate": 0.6}, "fault_500_rate"),
        ({"fault_script": ("explode",)}, "fault_script"),
        ({"tpm_limit": 1.5}, "tpm_limit"),
        ({"seed": True}, "seed"),
        ({"require_api_key": ""}, "require_api_key"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        MockServerConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (7.66, "7.66s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_durations_use_openai_header_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_cli_rejects_a_bad_value_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rpm-limit", "30", "--window-s", "1"])
    assert run_from_args(args) == 2
    assert "rpm_limit" in capsys.readouterr().err


async def test_child_process_server_serves_the_sdk_with_its_config() -> None:
    config = MockServerConfig(
        rpm_limit=600, window_s=1.0, seed=3, fault_script=("http_503", "none")
    )
    with running_in_process(config) as url:
        async with client_for(url) as c:
            with pytest.raises(openai.InternalServerError):
                await c.responses.create(model="m", input=PROMPT)
            response = await c.responses.create(model="m", input=PROMPT)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/_mock/config") as answer:
                served_config = await answer.json()
            async with http.get(f"{url}/_mock/log") as answer:
                records = (await answer.json())["records"]
    assert response.usage is not None and response.status == "completed"
    assert served_config == config.to_dict()
    assert [(r["status"], r["fault"]) for r in records] == [(503, "http_503"), (200, None)]
    assert max_arrivals_in_window([r["arrival_monotonic"] for r in records], 60.0) == 2


def test_thread_server_serves_the_sync_sdk() -> None:
    with running_in_thread(MockServerConfig(rpm_limit=60, window_s=1.0)) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0) as c:
            response = c.responses.create(model="m", input=PROMPT)
            with pytest.raises(openai.RateLimitError):
                c.responses.create(model="m", input=PROMPT)
        assert [r.status for r in server.log] == [200, 429]
    assert response.usage is not None


async def test_stop_returns_while_a_request_hangs(mock_server_factory: MockServerFactory) -> None:
    server = await mock_server_factory(fault_script=("hang",))
    async with client_for(server, timeout=30.0) as c:
        pending = asyncio.ensure_future(c.responses.create(model="m", input=PROMPT))
        async with asyncio.timeout(10):
            await server.wait_for_arrivals(1)
        await server.stop()
        with pytest.raises(openai.APIConnectionError):
            await pending


# ---------------------------------------------------------------- Chat Completions


async def test_chat_answers_the_same_conversation_with_the_responses_text_and_usage(
    client: AsyncOpenAI, mock_server: MockServer
) -> None:
    responses = await client.responses.create(
        model="gpt-4o-mini", instructions=INSTRUCTIONS, input=PROMPT, max_output_tokens=40
    )
    chat = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": PROMPT},
        ],
        max_completion_tokens=40,
    )
    assert chat.choices[0].message.content == responses.output_text
    assert responses.usage is not None and chat.usage is not None
    assert chat.usage.prompt_tokens == responses.usage.input_tokens
    assert chat.usage.completion_tokens == responses.usage.output_tokens
    assert chat.choices[0].finish_reason == (
        "length" if responses.status == "incomplete" else "stop"
    )
    assert [r.api for r in mock_server.log] == ["responses", "chat"]
    assert mock_server.log[1].output_tokens == chat.usage.completion_tokens


async def test_chat_stream_sends_usage_only_when_include_usage_is_set(
    client: AsyncOpenAI,
) -> None:
    messages: Any = [{"role": "user", "content": PROMPT}]
    plain = await client.chat.completions.create(model="m", messages=messages)
    with_usage = await client.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in with_usage]
    without = [
        c
        async for c in await client.chat.completions.create(
            model="m", messages=messages, stream=True
        )
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in without)
    assert without[-1].choices[0].finish_reason == "stop"


async def test_chat_structured_output_parses_into_the_pydantic_model(client: AsyncOpenAI) -> None:
    class Answer(BaseModel):
        city: str
        population: int

    parsed = await client.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "Biggest city?"}], response_format=Answer
    )
    assert parsed.choices[0].message.parsed == Answer(city="text", population=0)


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_stream_break_cuts_a_stream_mid_body_after_some_text(
    mock_server_factory: MockServerFactory, api: str
) -> None:
    server = await mock_server_factory(fault_script=("stream_break", "stream_break"))
    texts: list[str] = []
    async with client_for(server) as c:
        with pytest.raises(openai.APIConnectionError):
            if api == "chat":
                stream: Any = await c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": PROMPT}], stream=True
                )
                async for chunk in stream:
                    texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            else:
                stream = await c.responses.create(model="m", input=PROMPT, stream=True)
                async for event in stream:
                    if event.type == "response.output_text.delta":
                        texts.append(event.delta)
        with pytest.raises(openai.APIConnectionError):  # a plain call is dropped
            if api == "chat":
                await c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": PROMPT}]
                )
            else:
                await c.responses.create(model="m", input=PROMPT)
    assert "".join(texts), "some text arrived before the break"
    assert [r.fault for r in server.log] == ["stream_break", "stream_break"]
    assert all(r.counted for r in server.log)


async def test_chat_shares_the_rate_window_with_responses(
    mock_server_factory: MockServerFactory,
) -> None:
    server = await mock_server_factory(rpm_limit=2, window_s=60.0)
    async with client_for(server) as c:
        await c.responses.create(model="m", input=PROMPT)
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": PROMPT}]
            )
    assert [r.status for r in server.log] == [200, 200, 429]


async def test_chat_without_messages_is_a_400_naming_the_parameter(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[])
    assert caught.value.body["param"] == "messages"  # type: ignore[index]

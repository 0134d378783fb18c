"""Streamed calls end to end: the real openai SDK against the local server over loopback, on
both APIs (Responses and Chat Completions).

Each test checks what a plain call is held to: the stored events (order, fields), ``stats()``,
the gates and semaphore, the projections' folds and the span tree built from the events.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from llmtrail.pipeline import (
    BaseLLMService,
    ErrorType,
    Event,
    GenerationRequest,
    GenerationResult,
    estimate_input_tokens,
)
from llmtrail.pipeline._stream import GenerationStream
from llmtrail.storage._folds import FoldEvent, apply_calls, apply_usage
from llmtrail.telemetry import _attributes as A
from llmtrail.telemetry._spans import plan_call_spans
from llmtrail.testing._mock_server import running_in_thread
from tests.conftest import RecordingSink

KEY = "sk-test-0123456789abcdef"
APIS = ["openai", "openai-chat"]
STREAM_TYPES = [
    "trace_created",
    "gate_wait",
    "gate_wait",
    "semaphore_acquired",
    "sent",
    "first_token",
    "received",
    "completed",
]


def service_for(url: str, recorder: RecordingSink, api: str, **kwargs: Any) -> BaseLLMService:
    kwargs.setdefault("store_url", None)
    kwargs.setdefault("tracing", False)
    kwargs.setdefault("max_rpm", 6000)
    kwargs.setdefault("max_tpm", 10_000_000)
    kwargs.setdefault("sinks", [recorder])
    return BaseLLMService("gpt-4o-mini", base_url=f"{url}/v1", api_key=KEY, provider=api, **kwargs)


async def consume(stream: GenerationStream) -> tuple[list[str], GenerationResult]:
    deltas: list[str] = []
    result: GenerationResult | None = None
    async with stream:
        async for item in stream:
            if isinstance(item, GenerationResult):
                assert result is None, "exactly one result"
                result = item
            else:
                assert result is None, "no delta after the result"
                deltas.append(item)
    assert result is not None
    return deltas, result


def events_of(recorder: RecordingSink, call_id: str) -> list[Event]:
    return [e for e in recorder.events if e.call_id == call_id]


def payload(events: list[Event], kind: str) -> dict[str, Any]:
    (found,) = [e.payload for e in events if str(e.type) == kind]
    return found


def assert_released(service: BaseLLMService) -> None:
    stats = service.stats()
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.reserved_tokens == 0


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_consumed_fully_yields_deltas_then_the_result_and_its_events(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    request = GenerationRequest(user_prompt="Say hi", metadata={"tenant": "acme"})
    async with service_for(mock_server.url, recorder, api) as service:
        deltas, result = await consume(service.execute_generation_stream(request, "greet"))
        assert_released(service)
        usage = service.stats().usage["greet"]
    assert result.success, result.error_message
    assert len(deltas) == mock_server.config.stream_chunks
    assert "".join(deltas) == result.content == result.raw_content
    assert result.usage.input_tokens == 2 and result.usage.output_tokens > 0
    assert recorder.types(result.call_id) == STREAM_TYPES
    events = events_of(recorder, result.call_id)
    assert payload(events, "trace_created")["stream"] is True
    assert payload(events, "trace_created")["api"] == (
        "chat" if api == "openai-chat" else "responses"
    )
    first = payload(events, "first_token")
    received = payload(events, "received")
    assert 0 < first["ttft_s"] <= first["call_ttft_s"]
    assert received["latency_s"] >= first["ttft_s"]
    assert received["streamed"] is True
    assert received["partial"] is False and received["usage_estimated"] is False
    assert received["chunks"] == len(deltas)
    completed = payload(events, "completed")
    assert completed["outcome"] == "succeeded"
    assert completed["output_tokens"] == received["output_tokens"] == result.usage.output_tokens
    assert (usage.calls, usage.succeeded, usage.output_tokens) == (1, 1, result.usage.output_tokens)
    record = mock_server.log[-1]
    assert record.stream and record.api == ("chat" if api == "openai-chat" else "responses")
    assert record.client_request_id == f"{result.call_id}:1"


@pytest.mark.parametrize("api", APIS)
async def test_streamed_and_plain_calls_on_the_same_prompts_count_identically(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    prompts = [f"Explain topic {i} briefly." for i in range(3)]
    async with service_for(mock_server.url, recorder, api) as service:
        plain = [
            await service.execute_generation_async(GenerationRequest(user_prompt=p), "plain")
            for p in prompts
        ]
        streamed = [
            (await consume(service.execute_generation_stream(GenerationRequest(user_prompt=p))))[1]
            for p in prompts
        ]
        stats = service.stats()
    for a, b in zip(plain, streamed, strict=True):
        assert a.content == b.content
        assert a.usage == b.usage
    # The projections' folds over the recorded events: the same rows but for the mode.
    fold = [FoldEvent.from_event(i, e) for i, e in enumerate(recorder.events)]
    rows: dict[str, Any] = {}
    apply_calls(rows, fold, service.prices)
    for a, b in zip(plain, streamed, strict=True):
        ra, rb = rows[a.call_id], rows[b.call_id]
        for column in ("input_tokens", "output_tokens", "cached_tokens", "cost_usd", "attempts"):
            assert getattr(ra, column) == getattr(rb, column), column
        assert ra.outcome == rb.outcome == "succeeded"
    deltas: dict[Any, Any] = {}
    apply_usage(deltas, {}, fold, service.prices)
    by_op = {key.operation_name: row for key, row in deltas.items()}
    assert by_op["generation"].as_dict() == by_op["plain"].as_dict()
    plain_stats, stream_stats = stats.usage["plain"], stats.usage["generation"]
    assert plain_stats == stream_stats


async def test_chat_and_responses_calls_sit_side_by_side_in_the_same_projections(
    mock_server: Any, recorder: RecordingSink
) -> None:
    request = GenerationRequest(user_prompt="Name three rivers.", system_prompt="Be brief.")
    results = []
    for api in APIS:
        async with service_for(mock_server.url, recorder, api) as service:
            results.append(await service.execute_generation_async(request, api))
            results.append((await consume(service.execute_generation_stream(request, api)))[1])
            prices = service.prices
    assert {r.usage.output_tokens for r in results} == {results[0].usage.output_tokens}
    fold = [FoldEvent.from_event(i, e) for i, e in enumerate(recorder.events)]
    deltas: dict[Any, Any] = {}
    apply_usage(deltas, {}, fold, prices)
    rows = {key.operation_name: row for key, row in deltas.items()}
    assert set(rows) == set(APIS)
    assert rows["openai"].as_dict() == rows["openai-chat"].as_dict()
    assert rows["openai"].calls == rows["openai"].succeeded == 2


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_abandoned_after_the_first_chunk_ends_cancelled_with_tokens_seen(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    request = GenerationRequest(user_prompt="Tell me a story", max_output_tokens=200)
    async with service_for(mock_server.url, recorder, api) as service:
        stream = service.execute_generation_stream(request, "story")
        async with stream:
            async for item in stream:
                first = item
                break
        assert_released(service)
        usage = service.stats().usage["story"]
    assert isinstance(first, str) and first
    (call_id,) = recorder.by_call()
    assert recorder.types(call_id) == STREAM_TYPES
    events = events_of(recorder, call_id)
    received = payload(events, "received")
    assert received["partial"] is True and received["usage_estimated"] is True
    assert received["output_tokens"] == math.ceil(len(first) / 4)
    assert received["input_tokens"] == estimate_input_tokens(request)
    completed = payload(events, "completed")
    assert completed["outcome"] == "cancelled" and completed["error_type"] == "cancelled"
    assert completed["output_tokens"] == received["output_tokens"]
    assert (usage.calls, usage.cancelled, usage.succeeded) == (1, 1, 0)
    assert usage.output_tokens == received["output_tokens"]
    spans = plan_call_spans(events)
    assert spans[0].attributes[A.ERROR_TYPE] == "cancelled"
    assert spans[1].attributes[A.LLMTRAIL_OUTCOME] == "partial"


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_dropped_without_closing_is_cancelled_once_collected(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    async with service_for(mock_server.url, recorder, api) as service:
        async for _ in service.execute_generation_stream(GenerationRequest(user_prompt="Hi")):
            break  # no `async with`: the stream is garbage, its generator's finalizer ends it
        async with asyncio.timeout(5):
            while service.stats().in_flight:
                await asyncio.sleep(0)
    # aclose() waited for the call; its last event says how it ended.
    (call_id,) = recorder.by_call()
    assert recorder.types(call_id)[-1] == "completed"
    assert events_of(recorder, call_id)[-1].payload["outcome"] == "cancelled"


@pytest.mark.parametrize("api", APIS)
async def test_a_cancelled_consumer_ends_the_call_cancelled_and_releases_everything(
    mock_server_factory: Any, recorder: RecordingSink, api: str
) -> None:
    # The stream's head arrives at once, its text after 30 s: cancel in between.
    server = await mock_server_factory(latency_s=30.0)
    async with service_for(server.url, recorder, api) as service:

        async def read_all() -> None:
            await consume(service.execute_generation_stream(GenerationRequest(user_prompt="Hi")))

        task = asyncio.create_task(read_all())
        async with asyncio.timeout(5):
            await server.wait_for_arrivals(1)
            while not recorder.events or str(recorder.events[-1].type) != "sent":
                await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_released(service)
    (call_id,) = recorder.by_call()
    types = recorder.types(call_id)
    assert types[-1] == "completed"
    completed = events_of(recorder, call_id)[-1].payload
    assert completed["outcome"] == "cancelled"
    assert "first_token" not in types
    assert service.stats().usage["generation"].cancelled == 1


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_broken_mid_body_fails_with_its_own_error_and_is_not_retried(
    mock_server_factory: Any, recorder: RecordingSink, api: str
) -> None:
    server = await mock_server_factory(fault_script=("stream_break",), stream_chunks=8)
    async with service_for(server.url, recorder, api, max_attempts=3) as service:
        deltas, result = await consume(
            service.execute_generation_stream(GenerationRequest(user_prompt="Tell me more"))
        )
        assert_released(service)
        stats = service.stats().usage["generation"]
    assert deltas, "the deltas before the break reached the caller"
    assert not result.success
    assert result.error_type is ErrorType.STREAM_BROKEN
    assert "mid-stream" in (result.error_message or "")
    assert result.attempts == 1 and len(server.log) == 1
    assert result.raw_content == "".join(deltas)
    events = events_of(recorder, result.call_id)
    assert recorder.types(result.call_id) == STREAM_TYPES
    received = payload(events, "received")
    assert received["partial"] is True and received["usage_estimated"] is True
    assert received["output_tokens"] == math.ceil(len("".join(deltas)) / 4)
    assert payload(events, "completed")["error_type"] == "stream_broken"
    assert (stats.failed, stats.output_tokens) == (1, received["output_tokens"])
    spans = plan_call_spans(events)
    assert spans[0].error is not None and spans[0].attributes[A.ERROR_TYPE] == "stream_broken"


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_whose_usage_never_arrives_succeeds_with_the_documented_estimate(
    mock_server_factory: Any, recorder: RecordingSink, api: str
) -> None:
    server = await mock_server_factory(fault_script=("missing_usage",))
    request = GenerationRequest(user_prompt="Say hi", system_prompt="Be brief")
    async with service_for(server.url, recorder, api) as service:
        _, result = await consume(service.execute_generation_stream(request))
        assert_released(service)
    assert result.success, result.error_message
    assert result.usage.input_tokens == estimate_input_tokens(request)
    assert result.usage.output_tokens == math.ceil(len(result.content) / 4)
    received = payload(events_of(recorder, result.call_id), "received")
    assert received["usage_estimated"] is True and received["partial"] is False


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_is_retried_before_its_first_byte(
    mock_server_factory: Any, recorder: RecordingSink, api: str
) -> None:
    server = await mock_server_factory(fault_script=("http_503", "drop"))
    async with service_for(server.url, recorder, api, retry_backoff_base_s=0.01) as service:
        deltas, result = await consume(
            service.execute_generation_stream(GenerationRequest(user_prompt="Hi"))
        )
    assert result.success, result.error_message
    assert result.attempts == 3 and len(server.log) == 3
    assert "".join(deltas) == result.content
    types = recorder.types(result.call_id)
    assert types.count("attempt_failed") == 2 and types.count("first_token") == 1


@pytest.mark.parametrize("api", APIS)
async def test_the_semaphore_is_held_until_the_stream_ends(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    async with service_for(mock_server.url, recorder, api, max_concurrent_requests=1) as service:
        first = service.execute_generation_stream(GenerationRequest(user_prompt="one"))
        async with first:
            assert isinstance(await anext(first), str)
            second = asyncio.create_task(
                consume(service.execute_generation_stream(GenerationRequest(user_prompt="two")))
            )
            async with asyncio.timeout(5):
                while service.stats().waiting_semaphore == 0:
                    await asyncio.sleep(0)
            assert len(mock_server.log) == 1  # the second waits for the first's permit
            async for _ in first:
                pass
        _, result = await second
    assert result.success and len(mock_server.log) == 2


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
async def test_rpm_cap_holds_for_streamed_calls(
    mock_server_factory: Any, recorder: RecordingSink, api: str
) -> None:
    server = await mock_server_factory(latency_s=0.05, rpm_limit=240, window_s=1.0)
    async with service_for(
        server.url,
        recorder,
        api,
        max_rpm=240,
        rpm_window_seconds=1.0,
        max_concurrent_requests=2,
    ) as service:
        results = await asyncio.gather(
            *(
                consume(service.execute_generation_stream(GenerationRequest(user_prompt=f"q{i}")))
                for i in range(12)
            )
        )
    assert all(r.success for _, r in results)
    assert [r.status for r in server.log].count(429) == 0
    assert server.arrivals_in_any_window(1.0) <= 4


def test_the_sync_twin_streams_from_a_thread_and_ends_an_abandoned_stream_cancelled() -> None:
    recorder = RecordingSink()
    with (
        running_in_thread() as server,
        service_for(server.url, recorder, "openai-chat") as service,
    ):
        items = list(service.execute_generation_stream_sync(GenerationRequest(user_prompt="a")))
        for _ in service.execute_generation_stream_sync(GenerationRequest(user_prompt="b")):
            break
        stats = service.stats()
    *deltas, result = items
    assert isinstance(result, GenerationResult) and result.success
    assert "".join(deltas) == result.content
    assert stats.in_flight == 0
    outcomes = [e.payload["outcome"] for e in recorder.events if str(e.type) == "completed"]
    assert outcomes == ["succeeded", "cancelled"]


@pytest.mark.parametrize("api", APIS)
async def test_a_streamed_call_span_carries_time_to_first_chunk(
    mock_server: Any, recorder: RecordingSink, api: str
) -> None:
    async with service_for(mock_server.url, recorder, api) as service:
        _, result = await consume(
            service.execute_generation_stream(GenerationRequest(user_prompt="Hi"))
        )
    events = events_of(recorder, result.call_id)
    call_span, attempt = plan_call_spans(events)
    first = payload(events, "first_token")
    assert call_span.attributes[A.GEN_AI_REQUEST_STREAM] is True
    api_type = "chat_completions" if api == "openai-chat" else "responses"
    assert call_span.attributes[A.OPENAI_API_TYPE] == api_type
    assert call_span.attributes[A.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] == first["call_ttft_s"]
    assert call_span.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == result.usage.output_tokens
    assert [e.name for e in attempt.events] == [A.EVENT_FIRST_TOKEN]
    assert attempt.events[0].attributes[A.LLMTRAIL_TTFT_S] == first["ttft_s"]
    assert attempt.attributes[A.LLMTRAIL_OUTCOME] == "succeeded"


async def test_time_to_first_chunk_is_recorded_as_the_genai_metric(
    mock_server: Any, recorder: RecordingSink
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

    from llmtrail.telemetry import TracingSink

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    sink = TracingSink(meter_provider=meters)
    try:
        async with service_for(
            mock_server.url, recorder, "openai-chat", sinks=[recorder, sink]
        ) as service:
            _, streamed = await consume(
                service.execute_generation_stream(GenerationRequest(user_prompt="Hi"))
            )
            await service.execute_generation_async(GenerationRequest(user_prompt="Hi"))
        data = reader.get_metrics_data()
    finally:
        meters.shutdown()
    assert data is not None
    points = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == A.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK
        for p in m.data.data_points
        if isinstance(p, HistogramDataPoint)
    ]
    first = payload(events_of(recorder, streamed.call_id), "first_token")
    assert [p.count for p in points] == [1]  # the plain call records none
    assert points[0].sum == pytest.approx(first["call_ttft_s"])


async def test_own_loop_streams_run_on_the_service_loop_and_end_cancelled_when_abandoned(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with service_for(mock_server.url, recorder, "openai", own_loop=True) as service:
        deltas, result = await consume(
            service.execute_generation_stream(GenerationRequest(user_prompt="Hi"))
        )
        async with service.execute_generation_stream(GenerationRequest(user_prompt="Hi")) as s:
            async for _ in s:
                break
    assert result.success and "".join(deltas) == result.content
    outcomes = [e.payload["outcome"] for e in recorder.events if str(e.type) == "completed"]
    assert outcomes == ["succeeded", "cancelled"]


async def test_aclose_ends_a_stream_left_open_and_still_referenced(
    mock_server: Any, recorder: RecordingSink
) -> None:
    service = service_for(mock_server.url, recorder, "openai-chat")
    await service.start()
    stream = service.execute_generation_stream(GenerationRequest(user_prompt="Hi"))
    assert isinstance(await anext(stream), str)
    async with asyncio.timeout(10):
        await service.aclose()  # would wait forever on the open stream's call otherwise
    assert recorder.events[-1].payload["outcome"] == "cancelled"
    assert service.semaphore.in_flight() == 0
    del stream


def test_the_demo_streams_through_chat_and_shows_time_to_first_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from llmtrail.pipeline._cli import main

    argv = ["demo", "--api", "chat", "--stream", "--calls", "12", "--no-store", "--json"]
    assert main([*argv, "--fault-rate", "0", "--latency", "0.02"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["api"], summary["stream"], summary["succeeded"]) == ("chat", True, 12)
    assert 0.02 <= summary["ttft_p50_s"] <= summary["ttft_p95_s"]
    assert summary["output_tokens"] > 0 and summary["server_429s"] == 0


class _CompletionSink(RecordingSink):
    """Records events, and says when a call's ``completed`` went by."""

    def __init__(self) -> None:
        super().__init__()
        self.completed = asyncio.Event()

    def emit(self, event: object) -> bool:
        super().emit(event)
        if str(getattr(event, "type", "")) == "completed":
            self.completed.set()
        return True


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_relayed_to_a_client_that_disconnects_ends_cancelled(
    mock_server_factory: Any, api: str
) -> None:
    import aiohttp
    from aiohttp import web

    # 8 deltas, 0.2 s apart: the application's client leaves after the first one.
    server = await mock_server_factory(stream_chunks=8, stream_interval_s=0.2)
    sink = _CompletionSink()
    async with service_for(server.url, sink, api) as service:

        async def relay(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            prompt = GenerationRequest(user_prompt="Tell me everything")
            async with service.execute_generation_stream(prompt) as stream:
                async for item in stream:
                    if isinstance(item, str):
                        await response.write(item.encode())
            return response

        app = web.Application()
        app.router.add_get("/chat", relay)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                response = await session.get(f"http://127.0.0.1:{port}/chat")
                first = await response.content.readany()
                response.close()  # the browser tab is closed
            async with asyncio.timeout(5):
                await sink.completed.wait()
        finally:
            await runner.cleanup()
        assert_released(service)
    assert first
    (call_id,) = sink.by_call()
    events = events_of(sink, call_id)
    completed = payload(events, "completed")
    assert completed["outcome"] == "cancelled"
    received = payload(events, "received")
    assert received["partial"] is True and received["output_tokens"] > 0
    assert server.log[0].stream and server.log[0].status == 200

"""BaseLLMService end to end: the real openai SDK against the local server over loopback."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from llmtrail.pipeline import (
    BaseLLMService,
    ConfigurationError,
    ErrorType,
    EventType,
    GenerationRequest,
    PriceTable,
)
from llmtrail.testing._mock_server import MockServerConfig, running_in_thread
from tests.conftest import RecordingSink

KEY = "sk-test-0123456789abcdef"


def service_for(url: str, recorder: RecordingSink | None = None, **kwargs: Any) -> BaseLLMService:
    kwargs.setdefault("store_url", None)
    kwargs.setdefault("tracing", False)
    return BaseLLMService(
        kwargs.pop("model", "gpt-4o-mini"),
        base_url=f"{url}/v1",
        api_key=KEY,
        sinks=[recorder] if recorder is not None else [],
        **kwargs,
    )


def max_tokens_in_any_window(log: list[Any], window_s: float) -> int:
    arrivals = sorted(
        (r.arrival_monotonic, r.input_tokens + (r.output_tokens or 0)) for r in log if r.counted
    )
    best = 0
    for i, (start, _) in enumerate(arrivals):
        total = sum(t for at, t in arrivals[i:] if at < start + window_s)
        best = max(best, total)
    return best


async def test_a_call_returns_content_usage_cost_and_the_full_event_stream(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with service_for(mock_server.url, recorder) as service:
        result = await service.execute_generation_async(
            GenerationRequest(user_prompt="Say hi", metadata={"tenant": "acme"}), "greet"
        )
    assert result.success, result.error_message
    assert isinstance(result.content, str) and result.content
    assert result.usage.input_tokens == 2  # ceil(len("Say hi") / 4)
    assert result.usage.output_tokens > 0
    expected = PriceTable().cost(
        "gpt-4o-mini", input_tokens=2, output_tokens=result.usage.output_tokens
    )
    assert result.usage.cost_usd == expected
    assert result.attempts == 1
    assert len(result.trace_id) == 32
    assert recorder.types(result.call_id) == [
        "trace_created",
        "gate_wait",
        "gate_wait",
        "semaphore_acquired",
        "sent",
        "received",
        "completed",
    ]
    events = [e for e in recorder.events if e.call_id == result.call_id]
    assert [e.seq for e in events] == list(range(7))
    assert events[0].payload["metadata"] == {"tenant": "acme"}
    assert events[-1].payload["outcome"] == "succeeded"
    assert mock_server.log[-1].client_request_id == f"{result.call_id}:1"


@pytest.mark.slow
async def test_rpm_cap_holds_when_semaphore_is_saturated(mock_server_factory: Any) -> None:
    server = await mock_server_factory(latency_s=0.05)
    async with service_for(
        server.url, max_rpm=240, rpm_window_seconds=1.0, max_concurrent_requests=2
    ) as service:
        results = await asyncio.gather(
            *(
                service.execute_generation_async(GenerationRequest(user_prompt=f"q{i}"))
                for i in range(20)
            )
        )
    assert all(r.success for r in results)
    assert len(server.log) == 20
    assert server.arrivals_in_any_window(1.0) <= 4


@pytest.mark.slow
async def test_tpm_cap_holds_under_concurrency(mock_server_factory: Any) -> None:
    # 1,000 tokens per 1 s window at the server and at the gate; calls of about 500 tokens.
    server = await mock_server_factory(tpm_limit=60_000, window_s=1.0)
    prompt = "x" * 1600  # 400 input tokens, + 100 max output = 500 counted by the server
    async with service_for(
        server.url, max_tpm=60_000, rpm_window_seconds=1.0, max_concurrent_requests=10
    ) as service:
        results = await asyncio.gather(
            *(
                service.execute_generation_async(
                    GenerationRequest(user_prompt=prompt, max_output_tokens=100)
                )
                for _ in range(10)
            )
        )
    assert all(r.success for r in results), [r.error_message for r in results]
    assert [r.status for r in server.log].count(429) == 0
    assert max_tokens_in_any_window(server.log, 1.0) <= 1000


async def test_cancellation_at_gate_semaphore_and_in_flight_leaves_nothing_behind(
    mock_server_factory: Any, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(latency_s=5.0)
    service = service_for(
        server.url,
        recorder,
        max_rpm=120,
        max_tpm=1_000_000,
        rpm_window_seconds=1.0,
        max_concurrent_requests=1,
    )
    async with service:
        tasks = [
            asyncio.create_task(
                service.execute_generation_async(GenerationRequest(user_prompt="x"))
            )
            for _ in range(4)
        ]
        # one in flight, one at the semaphore (rpm capacity is 2 per window), two at the gate
        for _ in range(200):
            await asyncio.sleep(0.01)
            stats = service.stats()
            if stats.in_flight == 1 and stats.waiting_semaphore == 1 and stats.waiting_rpm == 2:
                break
        stats = service.stats()
        assert (stats.in_flight, stats.waiting_semaphore, stats.waiting_rpm) == (1, 1, 2)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        after = service.stats()
        assert (after.in_flight, after.waiting, after.reserved_tokens) == (0, 0, 0)
        rpm_gate, tpm_gate = service.gates
        assert rpm_gate is not None and tpm_gate is not None
        assert rpm_gate.reserved() == 0 and tpm_gate.reserved() == 0
    calls = recorder.by_call()
    assert len(calls) == 4
    for events in calls.values():
        assert events[-1].type is EventType.COMPLETED
        assert events[-1].payload["outcome"] == "cancelled"
    unmarked = [e for e in recorder.events if e.type is EventType.UNMARKED]
    assert unmarked, "reservations never sent must be given back with an unmarked event"


async def test_asyncio_timeout_around_a_call_completes_it_as_cancelled(
    mock_server_factory: Any, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(latency_s=5.0)
    async with service_for(server.url, recorder) as service:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await service.execute_generation_async(GenerationRequest(user_prompt="slow"))
        assert service.stats().in_flight == 0
    (events,) = recorder.by_call().values()
    assert [str(e.type) for e in events][-2:] == ["attempt_failed", "completed"]
    assert events[-1].payload["outcome"] == "cancelled"


@pytest.mark.slow
def test_sync_path_holds_the_cap_from_many_threads() -> None:
    with running_in_thread(MockServerConfig(latency_s=0.01)) as server:
        results: list[Any] = []
        with service_for(server.url, max_rpm=240, rpm_window_seconds=1.0) as service:

            def worker(i: int) -> None:
                results.append(service.execute_generation(GenerationRequest(user_prompt=f"t{i}")))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        assert len(results) == 12 and all(r.success for r in results)
        assert server.arrivals_in_any_window(1.0) <= 4


async def test_5xx_is_retried_and_each_attempt_is_recorded(
    mock_server_factory: Any, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(fault_script=["http_500", "http_503", "none"])
    async with service_for(server.url, recorder, retry_backoff_base_s=0.01) as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="retry me"))
    assert result.success and result.attempts == 3
    types = recorder.types(result.call_id)
    assert types.count("sent") == 3 == len(server.log)
    assert types.count("attempt_failed") == 2
    assert types.count("retry_scheduled") == 2
    waits = [e.payload["wait_s"] for e in recorder.events if e.type is EventType.RETRY_SCHEDULED]
    assert all(w > 0 for w in waits)


async def test_429_retry_after_is_honoured(
    mock_server_factory: Any, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(
        fault_script=["rate_limit_429", "none"], fault_429_retry_after_s=0.25
    )
    async with service_for(server.url, recorder) as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="busy"))
    assert result.success and result.attempts == 2
    (scheduled,) = [e for e in recorder.events if e.type is EventType.RETRY_SCHEDULED]
    assert scheduled.payload["wait_s"] == pytest.approx(0.25)
    assert scheduled.payload["reason"] == "rate_limited"
    gap = server.log[1].arrival_monotonic - server.log[0].arrival_monotonic
    assert gap >= 0.25


@pytest.mark.parametrize(
    ("config", "error_type", "attempts"),
    [
        ({"token_quota": 0}, ErrorType.QUOTA_EXCEEDED, 1),
        ({"require_api_key": "sk-other"}, ErrorType.AUTH, 1),
        ({"fault_script": ["malformed_json"]}, ErrorType.INVALID_RESPONSE, 1),
        ({"fault_script": ["missing_usage"]}, ErrorType.INVALID_RESPONSE, 1),
        ({"fault_script": ["http_500", "http_500", "http_500"]}, ErrorType.SERVER_ERROR, 3),
        ({"fault_script": ["drop", "drop", "drop"]}, ErrorType.CONNECTION, 3),
    ],
)
async def test_failures_are_classified_and_never_raise(
    mock_server_factory: Any, config: dict[str, Any], error_type: ErrorType, attempts: int
) -> None:
    server = await mock_server_factory(**config)
    async with service_for(server.url, retry_backoff_base_s=0.01) as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="x"))
    assert not result.success
    assert result.error_type is error_type, result.error_message
    assert result.attempts == attempts == len(server.log)


async def test_timeout_is_classified_and_retried(mock_server_factory: Any) -> None:
    server = await mock_server_factory(fault_script=["slow", "none"], slow_s=2.0)
    async with service_for(server.url, request_timeout_s=0.3, retry_backoff_base_s=0.01) as svc:
        result = await svc.execute_generation_async(GenerationRequest(user_prompt="x"))
    assert result.success and result.attempts == 2


async def test_refused_connection_gives_the_rpm_slot_back(recorder: RecordingSink) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = service_for(
        f"http://127.0.0.1:{port}",
        recorder,
        max_rpm=60,
        rpm_window_seconds=1.0,
        max_attempts=2,
        retry_backoff_base_s=0.01,
    )
    async with service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="x"))
        rpm_gate, _ = service.gates
        assert rpm_gate is not None and rpm_gate.used() == 0
    assert result.error_type is ErrorType.CONNECTION
    reasons = [e.payload["reason"] for e in recorder.events if e.type is EventType.UNMARKED]
    assert reasons == ["connection_refused", "connection_refused"]


class Verdict(BaseModel):
    label: str
    confidence: float
    tags: list[str]


async def test_response_schema_gives_a_validated_instance(mock_server: Any) -> None:
    async with service_for(mock_server.url) as service:
        result = await service.execute_generation_async(
            GenerationRequest(user_prompt="classify", response_schema=Verdict)
        )
    assert result.success, result.error_message
    assert isinstance(result.content, Verdict)
    assert result.raw_content and result.raw_content.startswith("{")


async def test_unknown_model_is_unpriced_not_free(mock_server: Any) -> None:
    async with service_for(mock_server.url, model="my-private-model") as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="x"))
        assert result.success
        assert result.usage.cost_usd is None
        assert service.stats().usage["generation"].unpriced_calls == 1


async def test_invalid_request_gets_trace_created_and_completed_failed(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with service_for(mock_server.url, recorder) as service:
        result = await service.execute_generation_async({"max_output_tokens": 0})  # type: ignore[arg-type]
    assert not result.success and result.error_type is ErrorType.VALIDATION
    assert recorder.types(result.call_id) == ["trace_created", "completed"]
    assert len(mock_server.log) == 0


async def test_request_larger_than_the_tpm_window_fails_without_sending(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with service_for(mock_server.url, recorder, max_tpm=1000, rpm_window_seconds=60) as svc:
        result = await svc.execute_generation_async(
            GenerationRequest(user_prompt="x", max_output_tokens=5000)
        )
    assert result.error_type is ErrorType.TOO_LARGE and "max_output_tokens" in str(
        result.error_message
    )
    assert len(mock_server.log) == 0


async def test_stats_and_current_rates_reflect_the_calls(mock_server: Any) -> None:
    async with service_for(mock_server.url) as service:
        for i in range(3):
            await service.execute_generation_async(GenerationRequest(user_prompt=f"x{i}"), "op")
        stats = service.stats()
        assert service.get_current_rpm() == 3 == stats.rpm
        assert (
            service.get_current_tpm()
            == stats.usage["op"].input_tokens + stats.usage["op"].output_tokens
        )
        assert stats.usage["op"].succeeded == 3
        assert stats.usage["op"].cost_usd > Decimal(0)


class Summarizer(BaseLLMService):
    async def summarize(self, text: str) -> str:
        result = await self.execute_generation_async(
            GenerationRequest(user_prompt=f"Summarize: {text}"), "summarize"
        )
        return str(result.content)


async def test_subclassing_adds_business_methods(mock_server: Any) -> None:
    async with Summarizer(base_url=f"{mock_server.url}/v1", api_key=KEY, store_url=None) as svc:
        assert await svc.summarize("a long text")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rpm": -5}, "max_rpm=-5"),
        ({"max_tpm": 0}, "max_tpm=0"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests=0"),
        ({"rpm_window_seconds": 0}, "rpm_window_seconds=0"),
        ({"max_attempts": 0}, "max_attempts=0"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BaseLLMService(base_url="http://127.0.0.1:1/v1", api_key=KEY, store_url=None, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "no prompt"),
        ({"user_prompt": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"user_prompt": "x", "temperature": 2.5}, "temperature"),
        ({"user_prompt": "x", "metadata": {"tenant": 3}}, "metadata"),
        ({"input": [{"role": "robot", "content": "x"}]}, "role"),
    ],
)
def test_invalid_requests_raise_value_error_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        GenerationRequest(**kwargs)


def test_cost_arithmetic_bills_cached_and_reasoning_tokens_exactly() -> None:
    table = PriceTable()
    # gpt-4o: $2.50 in, $1.25 cached in, $10 out per 1M; reasoning is part of output.
    cost = table.cost("gpt-4o", input_tokens=1_000, cached_tokens=400, output_tokens=300)
    assert (
        cost
        == Decimal("600") * Decimal("2.50") / 10**6
        + Decimal("400") * Decimal("1.25") / 10**6
        + Decimal("300") * Decimal("10.00") / 10**6
    )
    assert table.cost("gpt-4o-2024-08-06", input_tokens=10) == table.cost("gpt-4o", input_tokens=10)
    assert table.cost("nobody-knows", input_tokens=10) is None
    overridden = table.with_overrides({"nobody-knows": {"input": "1", "output": "2"}})
    assert overridden.cost("nobody-knows", input_tokens=10**6) == Decimal(1)


@pytest.mark.slow
async def test_shared_gates_on_redis_admit_calls(mock_server: Any, redis_url: str) -> None:
    import uuid

    async with service_for(
        mock_server.url,
        max_rpm=600,
        rpm_window_seconds=1.0,
        rate_limit_url=redis_url,
        model=f"gpt-4o-mini-{uuid.uuid4().hex[:6]}",  # a budget of its own
    ) as service:
        results = await asyncio.gather(
            *(
                service.execute_generation_async(GenerationRequest(user_prompt=f"r{i}"))
                for i in range(15)
            )
        )
    assert all(r.success for r in results), [r.error_message for r in results]
    assert mock_server.arrivals_in_any_window(1.0) <= 10


async def test_unreachable_redis_fails_closed_without_sending(mock_server: Any) -> None:
    async with service_for(
        mock_server.url, max_rpm=60, rate_limit_url="redis://127.0.0.1:1/0"
    ) as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="x"))
        assert service.stats().in_flight == 0
    assert result.error_type is ErrorType.LIMITER_UNAVAILABLE
    assert "127.0.0.1:1" in str(result.error_message)
    assert len(mock_server.log) == 0

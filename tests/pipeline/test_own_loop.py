"""``BaseLLMService(own_loop=True)``: calls run on the service's loop thread, awaited from the
caller's loop, with the caller's context, cancellation and cleanup intact."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from llmtrail.pipeline import (
    BaseLLMService,
    ConfigurationError,
    Event,
    EventType,
    GenerationRequest,
)
from tests.conftest import RecordingSink
from tests.pipeline.test_service import service_for


class ThreadRecordingSink(RecordingSink):
    """Records, with each event, the thread that emitted it and structlog's bound ids."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()
        self.bound: list[dict[str, Any]] = []

    def emit(self, event: object) -> bool:
        self.threads.add(threading.get_ident())
        self.bound.append(structlog.contextvars.get_contextvars())
        return super().emit(event)


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llmtrail-loop" and t.is_alive()]


@pytest.mark.slow
async def test_calls_run_on_the_service_loop_thread_with_the_callers_context(
    mock_server: Any,
) -> None:
    sink = ThreadRecordingSink()
    caller = TracerProvider(shutdown_on_exit=False).get_tracer("app")
    structlog.contextvars.bind_contextvars(request_path="/chat")
    try:
        async with service_for(mock_server.url, sink, own_loop=True) as service:
            assert len(_loop_threads()) == 1
            with caller.start_as_current_span("handler") as handler:
                results = await asyncio.gather(
                    *(
                        service.execute_generation_async(GenerationRequest(user_prompt=f"q{i}"))
                        for i in range(300)
                    )
                )
            stats = service.stats()
    finally:
        structlog.contextvars.unbind_contextvars("request_path")
    assert all(r.success for r in results), [r.error_message for r in results]
    assert sink.threads and threading.get_ident() not in sink.threads
    assert {r.trace_id for r in results} == {f"{handler.get_span_context().trace_id:032x}"}
    assert all(b.get("request_path") == "/chat" for b in sink.bound)
    assert all("call_id" in b for b in sink.bound)
    assert stats.usage["generation"].succeeded == 300
    assert _loop_threads() == [], "aclose stops the loop thread"


async def test_cancelling_the_caller_waits_for_the_calls_cleanup(
    mock_server_factory: Any,
) -> None:
    server = await mock_server_factory(latency_s=5.0)
    sink = ThreadRecordingSink()
    async with service_for(
        server.url, sink, own_loop=True, max_rpm=600, max_tpm=1_000_000
    ) as service:
        task = asyncio.create_task(
            service.execute_generation_async(GenerationRequest(user_prompt="slow"))
        )
        for _ in range(500):
            await asyncio.sleep(0.01)
            if service.stats().in_flight == 1:
                break
        assert service.stats().in_flight == 1
        task.cancel()
        task.cancel()  # a second cancellation while the first is being cleaned up
        with pytest.raises(asyncio.CancelledError):
            await task
        # Already done when the caller saw the CancelledError:
        events: list[Event] = sink.events
        assert events[-1].type is EventType.COMPLETED
        assert events[-1].payload["outcome"] == "cancelled"
        after = service.stats()
        assert (after.in_flight, after.waiting, after.reserved_tokens) == (0, 0, 0)

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await service.execute_generation_async(GenerationRequest(user_prompt="slow"))
        assert sink.events[-1].payload["outcome"] == "cancelled"
        assert service.stats().in_flight == 0


async def test_sync_and_async_calls_share_the_service_loop(mock_server: Any) -> None:
    sink = ThreadRecordingSink()
    async with service_for(mock_server.url, sink, own_loop=True, max_rpm=6000) as service:
        sync_result = await asyncio.to_thread(
            service.execute_generation, GenerationRequest(user_prompt="from a thread")
        )
        async_result = await service.execute_generation_async(
            GenerationRequest(user_prompt="from the loop")
        )
        assert service.stats().usage["generation"].calls == 2
    assert sync_result.success and async_result.success
    assert len(sink.threads) == 1, "both ran on the service's own loop thread"


def test_own_loop_from_the_environment_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTRAIL_OWN_LOOP", "1")
    assert BaseLLMService(api_key="k", store_url=None, tracing=False)._own_loop is True
    monkeypatch.setenv("LLMTRAIL_OWN_LOOP", "sometimes")
    with pytest.raises(ConfigurationError, match="LLMTRAIL_OWN_LOOP='sometimes'.*use 1 or 0"):
        BaseLLMService(api_key="k", store_url=None, tracing=False)
    monkeypatch.delenv("LLMTRAIL_OWN_LOOP")
    with pytest.raises(ConfigurationError, match="own_loop='yes' is invalid"):
        BaseLLMService(api_key="k", store_url=None, tracing=False, own_loop="yes")  # type: ignore[arg-type]

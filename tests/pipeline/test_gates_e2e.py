"""The send-time rule end to end: the real SDK against the local server, which enforces the limits.

The server runs in its own process (so its arrivals are not delayed by the client's event
loop) and answers after a latency; arrivals are counted in its log, on the shared monotonic
clock. Windows are scaled down to 1 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx2
import pytest

from llmtrail.pipeline import BaseLLMService, GenerationRequest, OpenAIResponsesProvider
from llmtrail.testing._mock_server import (
    MockServerConfig,
    max_arrivals_in_window,
    running_in_process,
)
from tests.conftest import RecordingSink

KEY = "sk-test-0123456789abcdef"
pytestmark = pytest.mark.slow


async def server_log(url: str) -> list[dict[str, Any]]:
    async with httpx2.AsyncClient() as client:
        answer = await client.get(f"{url}/_mock/log")
        answer.raise_for_status()
        records: list[dict[str, Any]] = answer.json()["records"]
        return records


def max_tokens_in_any_window(records: list[dict[str, Any]], window_s: float) -> int:
    arrivals = sorted(
        (float(r["arrival_monotonic"]), int(r["input_tokens"]) + 100)
        for r in records
        if r["counted"]
    )
    return max(
        sum(t for at, t in arrivals[i:] if at < start + window_s)
        for i, (start, _) in enumerate(arrivals)
    )


@pytest.mark.parametrize("gates", ["memory", "redis"])
@pytest.mark.parametrize("kind", ["rpm", "tpm"])
async def test_at_most_the_limit_arrives_in_any_window_and_no_call_is_refused(
    kind: str, gates: str, request: pytest.FixtureRequest
) -> None:
    # 10 requests or 1,300 tokens (10 calls of ~130) per 1 s window, at the server and the gate;
    # 200 ms per answer: the old rule (window from the answer) would leave a sixth unused, the
    # send-time rule starts it within the guard of the body's write.
    limits = {"rpm_limit": 600} if kind == "rpm" else {"tpm_limit": 78_000}
    config = MockServerConfig(latency_s=0.2, window_s=1.0, **limits)  # type: ignore[arg-type]
    recorder = RecordingSink()
    shared: dict[str, Any] = {}
    if gates == "redis":  # the shared gates: the same rule in Lua, on a budget of its own
        shared = {"rate_limit_url": request.getfixturevalue("redis_url")}
        shared["api_key"] = f"{KEY}-{uuid.uuid4().hex}"  # a fresh budget key
    with running_in_process(config) as url:
        service = BaseLLMService(
            "gpt-4o-mini",
            base_url=f"{url}/v1",
            api_key=KEY if gates == "memory" else shared.pop("api_key"),
            max_rpm=600 if kind == "rpm" else None,
            max_tpm=78_000 if kind == "tpm" else None,
            rpm_window_seconds=1.0,
            max_concurrent_requests=20,
            arrival_guard_s=0.05,
            store_url=None,
            tracing=False,
            sinks=[recorder],
            **shared,
        )
        async with service:
            results = await asyncio.gather(
                *(
                    service.execute_generation_async(
                        GenerationRequest(user_prompt=f"ticket {i} " * 20, max_output_tokens=100)
                    )
                    for i in range(40)
                )
            )
        records = await server_log(url)
    assert all(r.success for r in results), [r.error_message for r in results]
    assert [r["status"] for r in records].count(429) == 0
    if kind == "rpm":
        assert max_arrivals_in_window([float(r["arrival_monotonic"]) for r in records], 1.0) <= 10
    else:
        assert max_tokens_in_any_window(records, 1.0) <= 1_300
    received = [e for e in recorder.events if str(e.type) == "received"]
    assert len(received) == 40
    # The hook fired for every attempt: its window started from the body's write.
    assert all(e.payload["body_sent_s"] is not None for e in received)


async def test_the_send_time_is_read_after_the_write_however_late_the_loop_gets_to_it() -> None:
    def stall(request: httpx2.Request) -> None:
        time.sleep(0.3)  # a loop starved by other work between the hand-off and the write

    async def stalled(request: httpx2.Request) -> None:
        stall(request)

    recorder = RecordingSink()
    with running_in_process(MockServerConfig()) as url:
        http = httpx2.AsyncClient(event_hooks={"request": [stalled]})
        provider = OpenAIResponsesProvider(api_key=KEY, base_url=f"{url}/v1", http_client=http)
        service = BaseLLMService(
            "gpt-4o-mini", provider=provider, store_url=None, tracing=False, sinks=[recorder]
        )
        try:
            async with service:
                result = await service.execute_generation_async("hello")
        finally:
            await provider.aclose()
            await http.aclose()
    assert result.success
    (received,) = [e for e in recorder.events if str(e.type) == "received"]
    # The stall came before the bytes were written, so the window starts after it.
    assert received.payload["body_sent_s"] >= 0.3

"""Streamed calls through the store and gate backends: SQLite and PostgreSQL event stores, the
in-process and the Redis (shared) gates. The real openai SDK against the local server over
loopback, on both APIs.

Each backend is held to what the SQLite and in-process tests of test_stream.py check: the
stored events are the emitted ones, the projections fold streamed calls (fully read, abandoned,
broken) exactly like plain ones and rebuild to the same rows, ``stats()`` shows nothing held,
and the gates end up charged with the reconciled tokens and nothing left reserved.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from llmtrail.pipeline import BaseLLMService, ErrorType, GenerationRequest, estimate_input_tokens
from tests.conftest import RecordingSink

from .test_redis_gates import SharedState
from .test_stream import (
    APIS,
    KEY,
    STREAM_TYPES,
    assert_released,
    consume,
    events_of,
    payload,
    service_for,
)


async def _abandon(service: Any, request: GenerationRequest, op: str) -> str:
    """Read a stream's first delta, then leave it; returns that delta."""
    async with service.execute_generation_stream(request, op) as stream:
        async for item in stream:
            assert isinstance(item, str)
            return item
    raise AssertionError("the stream yielded nothing")


async def test_stored_projections_count_streamed_and_plain_calls_of_both_apis_identically(
    mock_server_factory: Any, recorder: RecordingSink, store_url: str
) -> None:
    from llmtrail.storage import EventStore, rebuild, run_projections
    from tests.storage.projection_events import snapshot

    server = await mock_server_factory(fault_script=("none",) * 8 + ("stream_break",))
    prompts = ["Name a river.", "Name a mountain."]
    for api in APIS:
        async with service_for(server.url, recorder, api, store_url=store_url) as service:
            for p in prompts:
                prompt = GenerationRequest(user_prompt=p, system_prompt="Be brief.")
                await service.execute_generation_async(prompt, f"{api} plain")
                await consume(service.execute_generation_stream(prompt, f"{api} streamed"))
    async with service_for(server.url, recorder, "openai-chat", store_url=store_url) as service:
        _, broken = await consume(
            service.execute_generation_stream(GenerationRequest(user_prompt="x"), "broken")
        )
        first = await _abandon(service, GenerationRequest(user_prompt="Tell me a story"), "left")
        assert_released(service)
        left_stats = service.stats().usage["left"]
    assert broken.error_type is ErrorType.STREAM_BROKEN
    (left_id,) = [
        c for c, e in recorder.by_call().items() if e[0].payload["operation_name"] == "left"
    ]
    store = await EventStore.open(store_url)
    try:
        for call_id in (broken.call_id, left_id):
            stored = await store.events_for_call(call_id)
            assert [str(e.type) for e in stored] == recorder.types(call_id) == STREAM_TYPES
            assert [e.event for e in stored] == events_of(recorder, call_id)
        await run_projections(store.engine)
        incremental = await snapshot(store.engine)
        await rebuild(store.engine)
        assert await snapshot(store.engine) == incremental
    finally:
        await store.aclose()
    usage = {row["operation_name"]: row for row in incremental["usage_daily"]}
    columns = ("calls", "succeeded", "input_tokens", "output_tokens", "cost_usd")
    reference = {c: usage["openai plain"][c] for c in columns}
    for op in ("openai streamed", "openai-chat plain", "openai-chat streamed"):
        assert {c: usage[op][c] for c in columns} == reference, op
    assert reference["calls"] == 2 and reference["output_tokens"] > 0
    rows = {row["call_id"]: row for row in incremental["calls"]}
    assert rows[broken.call_id]["outcome"] == "failed"
    assert rows[broken.call_id]["error_type"] == "stream_broken"
    assert rows[broken.call_id]["output_tokens"] == broken.usage.output_tokens > 0
    assert usage["broken"]["failed"] == 1
    # The abandoned stream: cancelled, billed the tokens it saw, in the store as in stats().
    left = rows[left_id]
    assert (left["outcome"], left["error_type"]) == ("cancelled", "cancelled")
    assert left["output_tokens"] == math.ceil(len(first) / 4)
    assert (usage["left"]["calls"], usage["left"]["cancelled"]) == (1, 1)
    assert usage["left"]["output_tokens"] == left_stats.output_tokens == left["output_tokens"]
    assert left_stats.cancelled == 1


@pytest.mark.parametrize("api", APIS)
async def test_streams_through_the_redis_gates_charge_the_reconciled_tokens_and_hold_nothing(
    mock_server: Any, recorder: RecordingSink, redis_url: str, api: str
) -> None:
    import hashlib

    api_key = f"{KEY}-{uuid.uuid4().hex}"  # a budget of its own in the shared gates
    budget = f"openai:gpt-4o-mini:{hashlib.sha256(api_key.encode()).hexdigest()[:16]}"
    windows = {gate: SharedState(redis_url, gate, budget) for gate in ("rpm", "tpm")}
    read = GenerationRequest(user_prompt="Say hi", metadata={"tenant": "acme"})
    left = GenerationRequest(user_prompt="Tell me a story")
    try:
        async with BaseLLMService(
            "gpt-4o-mini",
            base_url=f"{mock_server.url}/v1",
            api_key=api_key,
            provider=api,
            rate_limit_url=redis_url,
            max_rpm=600,
            max_tpm=100_000,
            store_url=None,
            tracing=False,
            sinks=[recorder],
        ) as service:
            assert windows["tpm"].used() == 0
            deltas, result = await consume(service.execute_generation_stream(read, "read"))
            first = await _abandon(service, left, "left")
            assert_released(service)
            stats = service.stats()
        # Read once the service closed: its gates apply their queued updates before closing.
        tpm_used, rpm_used = windows["tpm"].used(), windows["rpm"].used()
        held = [(w.pending(), w.queued()) for w in windows.values()]
    finally:
        for window in windows.values():
            window.delete()
    assert result.success, result.error_message
    assert "".join(deltas) == result.content
    (left_id,) = [c for c in recorder.by_call() if c != result.call_id]
    assert recorder.types(result.call_id) == recorder.types(left_id) == STREAM_TYPES
    outcomes = [payload(events_of(recorder, c), "completed")["outcome"] for c in recorder.by_call()]
    assert outcomes == ["succeeded", "cancelled"]
    abandoned = payload(events_of(recorder, left_id), "received")
    assert abandoned["partial"] is True and abandoned["usage_estimated"] is True
    assert abandoned["input_tokens"] == estimate_input_tokens(left)
    assert abandoned["output_tokens"] == math.ceil(len(first) / 4)
    # The shared windows: both requests, and each stream's tokens as reconciled at its end
    # (the usage the stream reported, or the estimate of the abandoned one).
    assert rpm_used == 2
    expected = result.usage.input_tokens + result.usage.output_tokens
    expected += abandoned["input_tokens"] + abandoned["output_tokens"]
    assert tpm_used == expected
    assert held == [(0, 0), (0, 0)]
    assert (stats.usage["read"].succeeded, stats.usage["left"].cancelled) == (1, 1)
    assert stats.usage["read"].output_tokens == result.usage.output_tokens

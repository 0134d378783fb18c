"""llmtrail.testing.InMemoryEventStore reads back exactly what the SQL store holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from llmtrail.storage import EventStore
from llmtrail.testing import InMemoryEventStore


async def test_the_in_memory_store_reads_back_what_the_sql_store_holds(
    mock_server_factory: Any, tmp_path: Path
) -> None:
    server = await mock_server_factory(fault_script=("rate_limit_429", "none"))
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    memory = InMemoryEventStore()
    async with BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test",
        store_url=url,
        sinks=[memory],
        tracing=False,
        retry_backoff_base_s=0.01,
    ) as service:
        first = await service.execute_generation_async(GenerationRequest(user_prompt="a"), "op")
        second = await service.execute_generation_async(GenerationRequest(user_prompt="b"), "op")
    assert first.success and first.attempts == 2 and second.success

    async with await EventStore.open(url) as sql:
        stored = await sql.read(0, 1_000)
        by_call = await sql.events_for_call(first.call_id)
        by_trace = await sql.events_for_trace(second.trace_id)
    assert [s.event for s in await memory.read(0, 1_000)] == [s.event for s in stored]
    assert [s.event for s in await memory.events_for_call(first.call_id)] == [
        s.event for s in by_call
    ]
    assert [s.event for s in await memory.events_for_trace(second.trace_id)] == [
        s.event for s in by_trace
    ]
    page = await memory.read(3, 4)
    assert [s.position for s in page] == [4, 5, 6, 7]
    assert [s.event for s in page] == [s.event for s in stored[3:7]]

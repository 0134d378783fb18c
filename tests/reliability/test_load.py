"""Many concurrent calls against a zero-latency local server: every event sequence is complete.

All calls are started at once (one ``gather``), go through the gates, the semaphore and the
real SDK, and are recorded in a SQLite store. Afterwards the store holds, for every call, a
contiguous stream that ends with one ``completed(succeeded)``, and exactly the events that were
emitted. RSS and event-loop lag are measured in benchmarks/, not here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import (
    assert_store_equals_emitted,
    assert_streams_complete,
    completed,
    stored_events,
)

pytestmark = pytest.mark.timeout(240)

# 10,000 took 102 s here (56 s CPU, 2 shared cores): over the suite's budget, so 2,000 by default;
# LLMTRAIL_RELIABILITY_LOAD_CALLS=10000 runs the full figure.
CALLS = int(os.environ.get("LLMTRAIL_RELIABILITY_LOAD_CALLS", "2000"))


@pytest.mark.slow
async def test_concurrent_calls_all_leave_complete_event_sequences_in_the_store(
    mock_server: Any, sqlite_url: str, recorder: RecordingSink
) -> None:
    with capture_logs():
        async with BaseLLMService(
            base_url=f"{mock_server.url}/v1",
            api_key="sk-test-load",
            store_url=sqlite_url,
            sinks=[recorder],
            tracing=False,
            max_rpm=None,
            max_tpm=None,
            max_concurrent_requests=100,
        ) as service:
            results = await asyncio.gather(
                *(
                    service.execute_generation_async(GenerationRequest(user_prompt=f"load {i}"))
                    for i in range(CALLS)
                )
            )
            stats = service.stats()

    assert sum(r.success for r in results) == CALLS
    assert (stats.in_flight, stats.waiting) == (0, 0)
    assert len(mock_server.log) == CALLS
    stored = await stored_events(sqlite_url)
    calls = assert_streams_complete(stored)
    assert len(calls) == CALLS
    assert all(completed(stream)["outcome"] == "succeeded" for stream in calls.values())
    assert_store_equals_emitted(stored, recorder.events)

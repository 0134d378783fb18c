"""``flush()`` and ``aclose()`` during a store outage return after ``store_timeout_s``.

The outage is real: another connection holds SQLite's write lock (``BEGIN EXCLUSIVE``), or
PostgreSQL's ``events`` table (``LOCK TABLE ... ACCESS EXCLUSIVE``) with the server answering.
While it lasts, write-ahead calls are refused (``store_unavailable``); then ``flush()`` returns
with one warning line counting the events not stored yet, and ``aclose()`` returns with one
error line counting the events it drops and saying why, with no writer task, thread or
connection left. The lock is still held when both return, so neither waited for it to end,
and the store holds exactly the emitted events but the dropped ones.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmtrail.pipeline import GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import store_locked, stored_events
from tests.reliability.test_store_outage import STORE_TIMEOUT_S, service_for

pytestmark = pytest.mark.timeout(120)

BOUND_S = 60  # a hang guard, not a speed claim


def writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "llmtrail event writer"]


async def test_flush_and_aclose_return_during_an_outage_and_report_what_is_not_stored(
    store_url: str, mock_server_factory: Any, recorder: RecordingSink
) -> None:
    url = store_url
    server = await mock_server_factory()
    threads_before = set(threading.enumerate())
    service = service_for(server, url, recorder, store_timeout_s=STORE_TIMEOUT_S)
    with capture_logs() as logs:
        await service.start()
        warm = await service.execute_generation_async(GenerationRequest(user_prompt="warm"))
        await service.flush()
        async with store_locked(url) as still_locked:
            refused = await asyncio.gather(
                *(
                    service.execute_generation_async(GenerationRequest(user_prompt=f"r {i}"))
                    for i in range(5)
                )
            )
            async with asyncio.timeout(BOUND_S):
                await service.flush()
            assert still_locked(), "flush() waited for the outage to end"
            flushed = [e for e in logs if e["event"].startswith("event store flush gave up")]
            async with asyncio.timeout(BOUND_S):
                await service.aclose()
            assert still_locked(), "aclose() waited for the outage to end"
            assert writer_tasks() == [], "the writer's drain task outlived aclose()"
        stored = await stored_events(url)

    assert warm.success
    assert {str(r.error_type) for r in refused} == {"store_unavailable"}
    emitted = {e.event_id for e in recorder.events}
    unstored = emitted - {r.event_id for r in stored}
    assert unstored, "the outage stored everything: the test saw no outage"
    assert {r.event_id for r in stored} <= emitted

    # flush(): one warning line, with the count of events not stored yet and why.
    assert len(flushed) == 1, flushed
    assert flushed[0]["log_level"] == "warning"
    assert flushed[0]["unstored"] == len(unstored)
    assert "store_timeout_s=0.5s" in flushed[0]["event"]
    # aclose(): one error line, with the count it drops and why.
    closed = [e for e in logs if e["log_level"] in ("error", "critical")]
    assert len(closed) == 1, closed
    assert closed[0]["unstored"] == len(unstored)
    assert f"closed with {len(unstored)} events not stored" in closed[0]["event"]
    assert "has not committed the batch in flight" in closed[0]["event"]

    # No thread of the writer (aiosqlite's connection threads) is left running; the loop's
    # own executor threads (asyncio_N, e.g. for DNS) belong to the test's loop.
    for thread in set(threading.enumerate()) - threads_before:
        if thread.name.startswith("asyncio_"):
            continue
        thread.join(timeout=BOUND_S)
        assert not thread.is_alive(), f"{thread.name} outlived aclose()"

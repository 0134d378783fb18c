"""A ``sent`` whose request never left is not counted as a request by any projection.

With write-ahead, an attempt's ``sent`` is emitted, then committed, then the request leaves.
During a real outage (another connection holds the store's lock) the commit does not come:
the call fails with ``store_unavailable``, or its caller cancels it while it waits, and the
request never reaches the server. Once the store is back those ``sent`` events are stored,
followed by an ``attempt_failed`` with ``not_sent``. Both folds (the incremental projection and
the SQL rebuild), on both backends, must then count exactly the requests the server received
(``metrics_minute.requests_sent``) and give the refused calls no attempt (``calls.attempts``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmtrail.pipeline import GenerationRequest
from llmtrail.storage import create_engine
from llmtrail.storage._projections import rebuild, run_projections
from tests.conftest import RecordingSink
from tests.reliability._support import store_locked
from tests.reliability.test_store_outage import STORE_TIMEOUT_S, service_for
from tests.storage.projection_events import snapshot

pytestmark = pytest.mark.timeout(120)


async def test_requests_that_never_left_are_not_counted_as_sent_by_either_fold(
    store_url: str, mock_server_factory: Any, recorder: RecordingSink
) -> None:
    url = store_url
    server = await mock_server_factory()
    service = service_for(server, url, recorder, store_timeout_s=STORE_TIMEOUT_S)
    with capture_logs():
        async with service:

            async def call(label: str) -> Any:
                return await service.execute_generation_async(GenerationRequest(user_prompt=label))

            sent = [await call(f"sent {i}") for i in range(3)]
            async with store_locked(url):
                refused = await asyncio.gather(*(call(f"refused {i}") for i in range(4)))
                # One more call, cancelled while it waits for its `sent` to be committed.
                cancelled = asyncio.create_task(call("cancelled"))
                async with asyncio.timeout(30):
                    while not any(e.type == "sent" for e in recorder.events[-3:]):
                        await asyncio.sleep(0.01)
                cancelled.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await cancelled
            sent.append(await call("after"))

    assert all(r.success for r in sent)
    assert {str(r.error_type) for r in refused} == {"store_unavailable"}
    assert [r.attempts for r in refused] == [0] * 4
    assert len(server.log) == len(sent)
    not_sent = [e for e in recorder.events if e.type == "attempt_failed"]
    assert len(not_sent) == 5 and all(e.payload["not_sent"] for e in not_sent)

    engine = create_engine(url)
    try:
        await run_projections(engine, batch_size=3)  # the incremental fold, in small batches
        folded = await snapshot(engine)
        await rebuild(engine)  # the SQL rebuild
        rebuilt = await snapshot(engine)
    finally:
        await engine.dispose()
    assert rebuilt == folded
    assert sum(row["requests_sent"] for row in folded["metrics_minute"]) == len(server.log)
    assert all(row["requests_sent"] >= 0 for row in folded["metrics_minute"])
    attempts = sorted(row["attempts"] for row in folded["calls"])
    assert attempts == [0] * 5 + [1] * len(sent)

"""Write-ahead survives SIGKILL: no acknowledged call without its ``completed``, no request
the provider got without its ``sent``.

The child (``_ack_worker.py``) prints each call id as its result comes back, and is killed at
a random instant during a burst or during steady load. The local server runs in this process,
so its log (one record per arrival, with the ``call_id:attempt`` the client sent) outlives the
child. The test then compares the three accounts: what the application saw, what the provider
received, and what the store holds. In process, a result and a cancellation come back only
once the call's ``completed`` can be read from the file. ``LLMTRAIL_KILL_TEST_DURABILITY=async``
runs all of it against the opt-out, to see it fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from llmtrail.testing._mock_server import MockServerConfig, running_in_thread
from tests.reliability._support import by_call, sqlite_path, stored_events, stream_problems

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

WORKER = Path(__file__).with_name("_ack_worker.py")
LLMTRAIL = Path(sys.executable).with_name("llmtrail")
DURABILITY = os.environ.get("LLMTRAIL_KILL_TEST_DURABILITY", "write_ahead")  # "async": fails


def kill_at_random(
    store_url: str, server_url: str, mode: str, delay_s: float, err: Path
) -> set[str]:
    """Run the worker, SIGKILL it ``delay_s`` after its first result; return the ids it printed."""
    done: set[str] = set()
    with err.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(WORKER), store_url, server_url, mode, DURABILITY],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert child.stdout is not None
        try:
            deadline = time.monotonic() + 60
            kill_at = None
            while time.monotonic() < (kill_at or deadline):
                wait = (kill_at or deadline) - time.monotonic()
                ready, _, _ = select.select([child.stdout], [], [], max(wait, 0))
                if not ready:
                    continue
                line = child.stdout.readline()
                if not line:
                    break  # the worker ended on its own: the assertion below says so
                done.add(line.split()[1])
                if kill_at is None:
                    kill_at = time.monotonic() + delay_s
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            # What it printed before the kill is still in the pipe: it was acknowledged too.
            done.update(line.split()[1] for line in child.stdout.read().splitlines())
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, err.read_text()[-3000:]
    return done


@pytest.mark.parametrize("mode", ["burst", "steady"])
def test_after_sigkill_every_acknowledged_call_is_completed_and_every_arrival_was_sent(
    store_url: str, mode: str, tmp_path: Path
) -> None:
    delay_s = random.uniform(0.05, 1.5)  # a random instant: printed on failure
    config = MockServerConfig(latency_s=0.01, latency_jitter_s=0.02)
    with running_in_thread(config) as server:
        acked = kill_at_random(store_url, server.url, mode, delay_s, tmp_path / "worker.err")
        arrivals = {r.client_request_id for r in server.log}
    rows = asyncio.run(stored_events(store_url))
    where = f"({mode}, killed {delay_s:.2f}s after the first result)"

    calls = by_call(rows)
    problems = [p for c, s in calls.items() for p in stream_problems(c, s, complete=False)]
    assert not problems, problems[:5]
    completed = {r.call_id for r in rows if r.type == "completed"}
    lost = acked - completed
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged calls have no completed {where}"
    sent = {f"{r.call_id}:{r.payload['attempt']}" for r in rows if r.type == "sent"}
    unlogged = arrivals - sent
    assert not unlogged, f"{len(unlogged)} of {len(arrivals)} arrivals have no sent {where}"
    assert acked and arrivals, f"nothing happened before the kill {where}"

    # `llmtrail events --incomplete` lists exactly the calls without `completed`, with whether
    # a request of theirs may have left.
    incomplete = set(calls) - completed
    listed = subprocess.run(
        [str(LLMTRAIL), "events", "--incomplete", "--json", "--store", store_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    found = {d["call_id"]: d for d in map(json.loads, listed.stdout.splitlines())}
    assert set(found) == incomplete
    for call_id, item in found.items():
        assert item["sent"] == any(e.type == "sent" for e in calls[call_id]), item
        assert item["last_event"] == calls[call_id][-1].type, item


# ---------------------------------------------------------------- the same promise, in process


def stored_types(url: str, call_id: str) -> list[str]:
    """The call's stored event types, read at once with sqlite3 (no flush, no writer help)."""
    connection = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True)
    try:
        query = "SELECT type FROM events WHERE call_id = ? ORDER BY seq"
        return [row[0] for row in connection.execute(query, (call_id,))]
    finally:
        connection.close()


async def test_a_result_and_a_cancellation_come_back_only_after_completed_is_committed(
    mock_server_factory: Any, sqlite_url: str
) -> None:
    server = await mock_server_factory(latency_s=0.5)
    async with BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test-write-ahead",
        store_url=sqlite_url,
        tracing=False,
        durability=DURABILITY,
    ) as service:
        result = await service.execute_generation_async(GenerationRequest(user_prompt="hi"))
        assert stored_types(sqlite_url, result.call_id)[-1] == "completed"

        bye = GenerationRequest(user_prompt="bye")
        task = asyncio.create_task(service.execute_generation_async(bye))
        await server.wait_for_arrivals(2)
        call_id = str(server.log[1].client_request_id).split(":")[0]
        assert "sent" in stored_types(sqlite_url, call_id)  # committed before it left
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stored_types(sqlite_url, call_id)[-1] == "completed"

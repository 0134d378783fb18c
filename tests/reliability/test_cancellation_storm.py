"""A cancellation storm: 1,000 calls, a seeded random half cancelled at every kind of point.

Where a call is cancelled is chosen by watching its own events (a :class:`StormSink` is a real
event sink): when a chosen call emits ``trace_created`` it is cancelled on the next loop turn,
which is while it waits at the RPM gate; after ``gate_wait(rpm)`` it is waiting at the TPM gate,
after ``gate_wait(tpm)`` at the semaphore, after ``sent`` it is in flight, after
``retry_scheduled`` in the retry backoff (a quarter of the answers are 500s). Others run inside an
``asyncio.timeout`` or are cancelled after a random delay. Where each cancellation really landed
is then read back from the stream, and every kind must have happened many times.

Afterwards nothing may be left behind (permits, waiters, reservations), and 200 more calls must
get the full capacity: exactly one window's worth passes the RPM gate without waiting (one
leaked unit would make it one fewer), and the semaphore reaches its full concurrency.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from llmtrail.pipeline import BaseLLMService, Event, EventType, GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import (
    assert_store_equals_emitted,
    assert_streams_complete,
    completed,
    stored_events,
)

pytestmark = pytest.mark.timeout(150)

STORM = 1_000
AFTER = 200
WINDOW_S = 1.0
RPM_PER_WINDOW = 100
TPM_PER_WINDOW = 30_000  # ~75 storm calls of 200..600 reserved tokens: the TPM gate binds too
CONCURRENCY = 5
TRIGGERS = {  # mode -> the event after which the call is cancelled
    "rpm_gate": (EventType.TRACE_CREATED, None),
    "tpm_gate": (EventType.GATE_WAIT, "rpm"),
    "semaphore": (EventType.GATE_WAIT, "tpm"),
    "in_flight": (EventType.SENT, None),
    "backoff": (EventType.RETRY_SCHEDULED, None),
}
MODES = (*TRIGGERS, "timeout", "delay")


class StormSink:
    """Cancels a chosen call on the loop turn after it emits its trigger event."""

    def __init__(self, modes: dict[str, str]) -> None:
        self.modes = modes  # request_id -> mode, for the calls to cancel
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self._request_of: dict[str, str] = {}  # call_id -> request_id

    def emit(self, event: Event) -> bool:
        if event.type is EventType.TRACE_CREATED:
            self._request_of[event.call_id] = event.payload["request_id"]
        request_id = self._request_of.get(event.call_id)
        mode = self.modes.get(request_id or "")
        trigger = TRIGGERS.get(mode or "")
        if (
            trigger is not None
            and event.type is trigger[0]
            and (trigger[1] is None or event.payload.get("gate") == trigger[1])
        ):
            asyncio.get_running_loop().call_soon(self.tasks[request_id or ""].cancel)
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def landed_at(stream: list[Any]) -> str:
    """Where a cancelled call was when the cancellation hit it, from its own events."""
    steps = [e for e in stream if e.type not in ("unmarked", "completed")]
    last = steps[-1]
    if last.type == "trace_created":
        return "rpm_gate"
    if last.type == "gate_wait":
        return "tpm_gate" if last.payload["gate"] == "rpm" else "semaphore"
    if last.type == "attempt_failed" and last.payload["error_type"] == "cancelled":
        return "in_flight"
    if last.type == "retry_scheduled":
        return "backoff"  # sleeping before the retry, or at the RPM gate for it
    return f"after {last.type}"


@pytest.mark.slow
async def test_a_cancellation_storm_leaks_nothing_and_the_next_calls_get_full_capacity(
    mock_server_factory: Any, sqlite_url: str, recorder: RecordingSink
) -> None:
    rng = random.Random(20)
    # Some 500s, so that calls also wait in retry backoff (and at the gate for a retry).
    server = await mock_server_factory(latency_s=0.05, latency_jitter_s=0.05, fault_500_rate=0.25)
    chosen = rng.sample(range(STORM), STORM // 2)
    modes = {f"storm-{i}": MODES[k % len(MODES)] for k, i in enumerate(chosen)}
    storm_sink = StormSink(modes)
    service = BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test-cancellation-storm",
        store_url=sqlite_url,
        sinks=[recorder, storm_sink],
        tracing=False,
        max_rpm=int(RPM_PER_WINDOW * 60 / WINDOW_S),
        max_tpm=int(TPM_PER_WINDOW * 60 / WINDOW_S),
        rpm_window_seconds=WINDOW_S,
        max_concurrent_requests=CONCURRENCY,
        request_timeout_s=30.0,
        retry_backoff_base_s=0.2,
        retry_backoff_max_s=0.4,
        max_event_queue=100_000,  # no backpressure wait: every call gets its stream
    )

    async def call(request: GenerationRequest, timeout_s: float | None) -> Any:
        if timeout_s is None:
            return await service.execute_generation_async(request, "storm")
        async with asyncio.timeout(timeout_s):
            return await service.execute_generation_async(request, "storm")

    loop = asyncio.get_running_loop()
    async with service:
        rpm, tpm = service.gates
        assert rpm is not None and tpm is not None
        tasks: dict[str, asyncio.Task[Any]] = {}
        for i in range(STORM):
            request_id = f"storm-{i}"
            request = GenerationRequest(
                user_prompt=f"storm call {i}",
                request_id=request_id,
                max_output_tokens=rng.randint(200, 600),
            )
            mode = modes.get(request_id)
            timeout_s = rng.uniform(0.0, 3.0) if mode == "timeout" else None
            tasks[request_id] = asyncio.create_task(call(request, timeout_s))
            if mode == "delay":
                loop.call_later(rng.uniform(0.0, 3.0), tasks[request_id].cancel)
        storm_sink.tasks = tasks
        ended = await asyncio.gather(*tasks.values(), return_exceptions=True)
        outcomes = dict(zip(tasks, ended, strict=True))

        # Nothing is held once the storm is over.
        stats = service.stats()
        assert (stats.in_flight, stats.waiting, stats.reserved_tokens) == (0, 0, 0)
        assert (rpm.reserved(), tpm.reserved(), rpm.waiting(), tpm.waiting()) == (0, 0, 0, 0)
        assert (service.semaphore.in_flight(), service.semaphore.waiting()) == (0, 0)
        # Sent slots expire after the window; a leaked pending reservation never would.
        for _ in range(200):
            if rpm.used() == 0 and tpm.used() == 0:
                break
            await asyncio.sleep(0.05)
        assert (rpm.used(), tpm.used()) == (0, 0)

        server.update_config(fault_500_rate=0.0)
        arrivals_before = len(server.log)
        after = await asyncio.gather(
            *(
                service.execute_generation_async(
                    GenerationRequest(
                        user_prompt=f"after the storm {i}",
                        request_id=f"after-{i}",
                        max_output_tokens=16,
                    ),
                    "after",
                )
                for i in range(AFTER)
            )
        )
        stats = service.stats()
        assert (stats.in_flight, stats.waiting, stats.reserved_tokens) == (0, 0, 0)

    calls = assert_streams_complete(recorder.events)
    by_request = {s[0].payload["request_id"]: s for s in calls.values()}
    assert len(by_request) == STORM + AFTER

    # Each cancelled call ends with completed(cancelled); every other call succeeded.
    where: Counter[str] = Counter()
    timed_out = 0
    late_cancellations = 0
    for request_id, outcome in outcomes.items():
        stream = by_request[request_id]
        done = completed(stream)
        if isinstance(outcome, asyncio.CancelledError | TimeoutError):
            timed_out += isinstance(outcome, TimeoutError)
            ended = (done["outcome"], done["error_type"])
            if ended == ("succeeded", None):
                # Write-ahead: the call had finished and was waiting for its `completed` to be
                # committed when the cancellation landed. The cancellation goes on, as it must;
                # the log keeps what happened: the provider answered (and billed) the call.
                assert "received" in [e.type for e in stream], request_id
                late_cancellations += 1
                continue
            assert ended == ("cancelled", "cancelled"), request_id
            where[landed_at(stream)] += 1
            types = [e.type for e in stream]
            if "sent" not in types:
                # Never sent: every reservation it got was given back.
                held = {e.payload["gate"] for e in stream if e.type == "gate_wait"}
                returned = {
                    e.payload["gate"]
                    for e in stream
                    if e.type == "unmarked" and e.payload["reason"] == "cancelled"
                }
                assert held == returned, (request_id, types)
        else:
            assert not isinstance(outcome, BaseException), (request_id, outcome)
            if outcome.success:
                assert done["outcome"] == "succeeded", request_id
            else:  # 500s on every attempt: rare, and the only failure allowed here
                assert (done["outcome"], done["error_type"]) == ("failed", "server_error")
                assert outcome.attempts == 3
    assert late_cancellations <= 0.05 * STORM, late_cancellations
    assert sum(where.values()) >= 0.4 * STORM, where
    for point in ("rpm_gate", "tpm_gate", "semaphore", "in_flight"):
        assert where[point] >= 20, where
    assert where["backoff"] >= 5, where
    assert timed_out >= 20, where

    # The next 200 calls ran at full capacity.
    assert all(r.success for r in after)
    assert len(server.log) - arrivals_before == AFTER
    after_streams = [by_request[f"after-{i}"] for i in range(AFTER)]
    rpm_waits = [
        e.payload["waited_s"]
        for s in after_streams
        for e in s
        if e.type == "gate_wait" and e.payload["gate"] == "rpm"
    ]
    tpm_waits = [
        e.payload["waited_s"]
        for s in after_streams
        for e in s
        if e.type == "gate_wait" and e.payload["gate"] == "tpm"
    ]
    assert sum(w == 0 for w in rpm_waits) == RPM_PER_WINDOW  # one whole window, no unit lost
    assert all(w == 0 for w in tpm_waits)  # 200 small calls fit one TPM window
    in_flight = [
        e.payload["in_flight"] for s in after_streams for e in s if e.type == "semaphore_acquired"
    ]
    assert max(in_flight) == CONCURRENCY  # every permit came back

    assert_store_equals_emitted(await stored_events(sqlite_url), recorder.events)

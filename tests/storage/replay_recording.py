"""Event streams shaped exactly as ``BaseLLMService`` records them, for the replay tests.

Workloads built from them go through extraction in every test. ``Recording`` records calls as
if no gate waited; the replay decides the waits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrail.pipeline import Event, EventType
from llmtrail.storage import EventStore, open_store_sink
from llmtrail.storage._workload_read import extract_workload, load_workload

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
LIMITS = {
    "max_rpm": None,
    "max_tpm": None,
    "window_s": 60.0,
    "max_concurrent_requests": 100,
    "max_attempts": 3,
    "default_max_output_tokens": 1024,
    "send_guard_s": None,
    "unanswered_guard_s": 1.0,
}


class Recording:
    """Event streams of calls as ``BaseLLMService`` records them (no gates waited)."""

    def __init__(self, **limits: Any) -> None:
        self.limits = {**LIMITS, **limits}
        self.events: list[Event] = []
        self._n = 0

    def call(
        self,
        at: float,
        attempts: list[dict[str, Any]] | None = None,
        *,
        model: str = "gpt-4o-mini",
        input_tokens: int = 100,
        output_tokens: int = 50,
        max_output_tokens: int | None = None,
        reserved: int | None = None,
        error_type: str | None = None,
        unsent: bool = False,
        rpm_wait: float = 0.0,
    ) -> str:
        """One call arriving ``at`` seconds after T0. ``attempts``: dicts with ``latency``
        and optionally ``error`` (+ ``status``, ``retry_after``, ``wait``, ``refused``),
        ``headers`` (the x-ratelimit-* headers), ``processing`` (the provider's time),
        ``body_sent`` and ``first_byte`` (the send-time hook's), ``streamed`` and ``pre_send``
        (from the ``sent`` event to the send: its write-ahead); ``rpm_wait``:
        the call's recorded wait at the RPM gate (its time is included in the call's, not
        added)."""
        call_id = f"call{self._n:04d}"
        self._n += 1
        seq = iter(range(100))
        attempts = [{"latency": 1.0}] if attempts is None and not unsent else attempts or []

        def emit(kind: EventType, t: float, payload: dict[str, Any]) -> None:
            self.events.append(
                Event(
                    call_id,
                    next(seq),
                    kind,
                    T0 + timedelta(seconds=t),
                    "0" * 31 + "1",
                    "0" * 15 + "1",
                    payload,
                )
            )

        emit(
            EventType.TRACE_CREATED,
            at,
            {
                "operation_name": "summarize",
                "model": model,
                "estimated_input_tokens": input_tokens,
                "max_output_tokens": max_output_tokens,
                "reserved_tokens": reserved
                if reserved is not None
                else input_tokens + (max_output_tokens or 1024),
                "limits": self.limits,
            },
        )
        t = at
        total_wait = 0.0
        answer: dict[str, Any] | None = None
        for n, attempt in enumerate(attempts, start=1):
            emit(EventType.SENT, t, {"attempt": n})
            t += attempt.get("pre_send", 0.0)  # the write-ahead of `sent`
            latency = attempt.get("latency", 1.0)
            t += latency
            error = attempt.get("error")
            if error is None:
                answer = {
                    "attempt": n,
                    "latency_s": latency,
                    "status": 200,
                    "response_model": f"{model}-2024-07-18" if model == "gpt-4o-mini" else model,
                    "input_tokens": input_tokens,
                    "cached_tokens": 0,
                    "output_tokens": output_tokens,
                    "reasoning_tokens": 0,
                    "rate_limits": attempt.get("headers", {}),
                    "processing_s": attempt.get("processing"),
                    "body_sent_s": attempt.get("body_sent"),
                    "first_byte_s": attempt.get("first_byte"),
                }
                if attempt.get("streamed"):
                    answer["streamed"] = True
                emit(EventType.RECEIVED, t, answer)
                break
            emit(
                EventType.ATTEMPT_FAILED,
                t,
                {
                    "attempt": n,
                    "latency_s": latency,
                    "error_type": error,
                    "status": attempt.get("status", 429 if error == "rate_limited" else None),
                    "retry_after_s": attempt.get("retry_after"),
                    "retryable": attempt.get("retryable", True),
                    "rate_limits": attempt.get("headers", {}),
                    "body_sent_s": attempt.get("body_sent"),
                    "first_byte_s": attempt.get("first_byte"),
                },
            )
            if attempt.get("refused"):
                emit(
                    EventType.UNMARKED,
                    t,
                    {"gate": "rpm", "attempt": n, "amount": 1, "reason": "connection_refused"},
                )
            if "wait" in attempt:
                emit(
                    EventType.RETRY_SCHEDULED,
                    t,
                    {"attempt": n, "next_attempt": n + 1, "wait_s": attempt["wait"]},
                )
                t += attempt["wait"]
                total_wait += attempt["wait"]
        outcome = "succeeded" if answer is not None else "failed"
        emit(
            EventType.COMPLETED,
            t,
            {
                "outcome": outcome,
                "error_type": None if answer else (error_type or attempts[-1].get("error")),
                "attempts": len(attempts),
                "model": answer["response_model"] if answer else model,
                "total_s": t - at,
                "rpm_wait_s": rpm_wait,
                "tpm_wait_s": 0.0,
                "semaphore_wait_s": 0.0,
            },
        )
        return call_id

    def workload(self, **kwargs: Any) -> Any:
        return extract_workload(self.events, **kwargs)


def burst(n: int, latency: float = 1.0, **limits: Any) -> Any:
    """``n`` calls arriving together at t=0, each answered after ``latency``."""
    rec = Recording(**limits)
    for _ in range(n):
        rec.call(0.0, [{"latency": latency}])
    return rec.workload()


async def write(url: str, events: list[Event]) -> None:
    writer = open_store_sink(url)
    await writer.start()
    for event in events:
        if not writer.emit(event):
            await writer.wait_for_room()
    await writer.flush()
    await writer.aclose()


async def load(url: str, **kwargs: Any) -> Any:
    store = await EventStore.open(url)
    try:
        return await load_workload(store.engine, **kwargs)
    finally:
        await store.aclose()

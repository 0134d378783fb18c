"""Synthetic lifecycle streams shaped exactly as pipeline/_service.py emits them.

Each scenario returns the events of one call, with envelope ids and microsecond timestamps
advancing on a fake clock (no sleeping). Payload keys mirror the service's ``call.emit(...)``
dicts one to one, so a change there that the tracing sink must follow shows up here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrail.pipeline import Event, EventType

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
API_KEY = "sk-test-abcdefghijklmnop1234"


@dataclass
class StreamBuilder:
    call_id: str = field(default_factory=lambda: os.urandom(8).hex())
    trace_id: str = field(default_factory=lambda: os.urandom(16).hex())
    span_id: str = field(default_factory=lambda: os.urandom(8).hex())
    now: datetime = T0
    instance: str = "testhost:1234"
    events: list[Event] = field(default_factory=list)

    def advance(self, seconds: float) -> StreamBuilder:
        self.now += timedelta(microseconds=round(seconds * 1_000_000))
        return self

    def emit(self, type_: EventType, payload: dict[str, Any]) -> StreamBuilder:
        self.events.append(
            Event(
                call_id=self.call_id,
                seq=len(self.events),
                type=type_,
                occurred_at=self.now,
                trace_id=self.trace_id,
                span_id=self.span_id,
                payload=payload,
                instance=self.instance,
            )
        )
        return self

    # --- one event each, with the service's payload keys --------------------------------
    def created(
        self,
        *,
        model: str = "gpt-4o-mini",
        operation_name: str = "greet",
        parent_span_id: str | None = None,
        capture_content: bool = False,
        metadata: dict[str, str] | None = None,
        temperature: float | None = 0.2,
        max_output_tokens: int | None = 64,
    ) -> StreamBuilder:
        payload: dict[str, Any] = {
            "operation_name": operation_name,
            "model": model,
            "request_id": "req-1",
            "metadata": dict(metadata or {"team": "search"}),
            "estimated_input_tokens": 12,
            "max_output_tokens": max_output_tokens,
            "reserved_tokens": 12 + (max_output_tokens or 1024),
            "rpm_at_start": 3,
            "tpm_at_start": 150,
            "parent_span_id": parent_span_id,
            "temperature": temperature,
            "reasoning_effort": None,
            "server_address": "127.0.0.1",
            "server_port": 8123,
            "capture_content": capture_content,
        }
        if capture_content:
            payload["input"] = [{"role": "user", "content": "Say hi"}]
        return self.emit(EventType.TRACE_CREATED, payload)

    def gate(
        self, gate: str, waited_s: float, *, attempt: int = 1, amount: int = 1
    ) -> StreamBuilder:
        self.advance(waited_s + 0.000010)
        return self.emit(
            EventType.GATE_WAIT,
            {
                "gate": gate,
                "attempt": attempt,
                "amount": amount,
                "waited_s": waited_s,
                "waiters_ahead": 2 if waited_s else 0,
            },
        )

    def semaphore(self, waited_s: float) -> StreamBuilder:
        self.advance(waited_s + 0.000005)
        return self.emit(
            EventType.SEMAPHORE_ACQUIRED,
            {"waited_s": waited_s, "in_flight": 4, "waiters_ahead": 1 if waited_s else 0},
        )

    def sent(self, attempt: int) -> StreamBuilder:
        return self.advance(0.000020).emit(EventType.SENT, {"attempt": attempt})

    def received(
        self, attempt: int, latency_s: float = 0.350, *, capture_content: bool = False
    ) -> StreamBuilder:
        self.advance(latency_s)
        payload: dict[str, Any] = {
            "attempt": attempt,
            "latency_s": latency_s,
            "status": 200,
            "response_id": "resp_abc123",
            "response_model": "gpt-4o-mini-2024-07-18",
            "finish_reasons": ["stop"],
            "input_tokens": 12,
            "cached_tokens": 4,
            "output_tokens": 9,
            "reasoning_tokens": 2,
            "total_tokens": 21,
            "cost_usd": "0.0000072",
            "provider_request_id": "req_provider_1",
            "rate_limits": {"x-ratelimit-remaining-requests": "99"},
        }
        if capture_content:
            payload["content"] = "Hi there!"
        return self.emit(EventType.RECEIVED, payload)

    def failed(
        self,
        attempt: int,
        error_type: str,
        *,
        status: int | None,
        retryable: bool,
        retry_after_s: float | None = None,
        message: str = "boom",
        latency_s: float = 0.120,
    ) -> StreamBuilder:
        self.advance(latency_s)
        return self.emit(
            EventType.ATTEMPT_FAILED,
            {
                "attempt": attempt,
                "latency_s": latency_s,
                "error_type": error_type,
                "status": status,
                "retryable": retryable,
                "retry_after_s": retry_after_s,
                "message": message,
                "provider_code": None,
                "provider_request_id": "req_provider_x",
                "rate_limits": {},
            },
        )

    def retry(
        self, attempt: int, wait_s: float, reason: str, retry_after_s: float | None
    ) -> StreamBuilder:
        self.advance(0.000030).emit(
            EventType.RETRY_SCHEDULED,
            {
                "attempt": attempt,
                "next_attempt": attempt + 1,
                "wait_s": wait_s,
                "reason": reason,
                "retry_after_s": retry_after_s,
            },
        )
        return self.advance(wait_s)

    def unmarked(
        self, gate: str, reason: str, *, attempt: int = 1, amount: int = 1
    ) -> StreamBuilder:
        return self.advance(0.000005).emit(
            EventType.UNMARKED,
            {"gate": gate, "attempt": attempt, "amount": amount, "reason": reason},
        )

    def completed(
        self,
        outcome: str,
        *,
        attempts: int,
        error_type: str | None = None,
        error_message: str | None = None,
        rpm_wait_s: float = 0.0,
        tpm_wait_s: float = 0.0,
        semaphore_wait_s: float = 0.0,
        succeeded_usage: bool = False,
    ) -> StreamBuilder:
        self.advance(0.000040)
        usage = (12, 4, 9, 2) if succeeded_usage else (0, 0, 0, 0)
        total_s = (self.now - self.events[0].occurred_at).total_seconds()
        return self.emit(
            EventType.COMPLETED,
            {
                "outcome": outcome,
                "error_type": error_type,
                "error_message": error_message,
                "attempts": attempts,
                "input_tokens": usage[0],
                "cached_tokens": usage[1],
                "output_tokens": usage[2],
                "reasoning_tokens": usage[3],
                "total_tokens": usage[0] + usage[2],
                "cost_usd": "0.0000072" if succeeded_usage else None,
                "model": "gpt-4o-mini-2024-07-18" if succeeded_usage else "gpt-4o-mini",
                "response_id": "resp_abc123" if succeeded_usage else None,
                "rpm_wait_s": rpm_wait_s,
                "tpm_wait_s": tpm_wait_s,
                "semaphore_wait_s": semaphore_wait_s,
                "latency_s": 0.35,
                "total_s": total_s,
            },
        )


# --- scenarios -----------------------------------------------------------------------------
def success(**created: Any) -> StreamBuilder:
    """Waits at the rpm gate and the semaphore, 0.3 ms at the tpm gate; one attempt succeeds."""
    capture = bool(created.get("capture_content"))
    b = StreamBuilder().created(**created)
    b.gate("rpm", 0.25).gate("tpm", 0.0003, amount=76).semaphore(0.1)
    b.sent(1).received(1, capture_content=capture)
    b.unmarked("tpm", "reconciled", amount=55)
    return b.completed(
        "succeeded",
        attempts=1,
        rpm_wait_s=0.25,
        tpm_wait_s=0.0003,
        semaphore_wait_s=0.1,
        succeeded_usage=True,
    )


def retry_then_success() -> StreamBuilder:
    """Attempt 1 gets a 429 with Retry-After; attempt 2 waits at the rpm gate and succeeds."""
    b = StreamBuilder().created()
    b.gate("rpm", 0.0).gate("tpm", 0.0, amount=76).semaphore(0.0)
    b.sent(1).failed(1, "rate_limited", status=429, retryable=True, retry_after_s=0.5)
    b.retry(1, 0.5, "rate_limited", 0.5)
    b.gate("rpm", 0.05, attempt=2).sent(2).received(2)
    return b.completed("succeeded", attempts=2, rpm_wait_s=0.05, succeeded_usage=True)


def failure() -> StreamBuilder:
    """A non-retryable 401 whose provider message quotes the (masked) key."""
    b = StreamBuilder().created()
    b.gate("rpm", 0.0).gate("tpm", 0.0, amount=76).semaphore(0.0)
    message = f"Incorrect API key provided: {API_KEY}"
    b.sent(1).failed(1, "auth", status=401, retryable=False, message=message)
    return b.completed("failed", attempts=1, error_type="auth", error_message=message)


def connection_refused() -> StreamBuilder:
    """Every attempt refused: the rpm slot goes back per attempt, the tpm one at the end."""
    b = StreamBuilder().created()
    b.gate("rpm", 0.0).gate("tpm", 0.0, amount=76).semaphore(0.0)
    b.sent(1).failed(1, "connection", status=None, retryable=True, message="refused")
    b.unmarked("rpm", "connection_refused", attempt=1)
    b.retry(1, 0.2, "connection", None)
    b.gate("rpm", 0.0, attempt=2).sent(2).failed(2, "connection", status=None, retryable=False)
    b.unmarked("rpm", "connection_refused", attempt=2)
    b.unmarked("tpm", "connection_refused", amount=76)
    return b.completed("failed", attempts=2, error_type="connection", error_message="refused")


def cancelled_in_flight() -> StreamBuilder:
    """The caller cancels while attempt 1 is on the wire."""
    b = StreamBuilder().created()
    b.gate("rpm", 0.0).gate("tpm", 0.0, amount=76).semaphore(0.0)
    b.sent(1).failed(
        1, "cancelled", status=None, retryable=False, message="cancelled while in flight"
    )
    return b.completed("cancelled", attempts=1, error_type="cancelled", error_message="cancelled")


def validation_failure() -> StreamBuilder:
    """The request never reached a gate: trace_created and completed(failed) only."""
    b = StreamBuilder().created(max_output_tokens=None, temperature=None, metadata={})
    return b.completed(
        "failed",
        attempts=0,
        error_type="validation",
        error_message="GenerationRequest has no prompt",
    )


ALL_SCENARIOS = {
    "success": success,
    "retry_then_success": retry_then_success,
    "failure": failure,
    "connection_refused": connection_refused,
    "cancelled_in_flight": cancelled_in_flight,
    "validation_failure": validation_failure,
}

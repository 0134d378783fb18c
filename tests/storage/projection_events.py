"""Builders of valid lifecycle event streams for the projection and audit tests.

A stream follows pipeline/_events.py: trace_created, gate waits, semaphore, attempts (sent then
received or attempt_failed + retry_scheduled), unmarked, completed. ``complete=False`` cuts the
stream before ``completed`` (the process died), at ``cut`` events if given.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from llmtrail.pipeline import Event, EventType

T0 = datetime(2025, 3, 1, 23, 58, 30, tzinfo=UTC)


@dataclass
class CallSpec:
    call_id: str
    start: datetime = T0
    model: str = "gpt-4o-mini"
    operation: str = "greet"
    metadata: dict[str, str] = field(default_factory=dict)
    # error_type of each failed attempt before the last one
    failures: Sequence[str] = ()
    # succeeded | failed | cancelled | validation
    outcome: str = "succeeded"
    final_error: str = "server_error"
    complete: bool = True
    cut: int | None = None
    input_tokens: int = 120
    cached_tokens: int = 20
    output_tokens: int = 40
    reasoning_tokens: int = 8
    rpm_wait_s: float = 0.5
    tpm_wait_s: float = 0.25
    semaphore_wait_s: float = 0.125
    latency_s: float = 0.75
    step_s: float = 7.0


def call_events(spec: CallSpec) -> list[Event]:
    digest = hashlib.sha256(spec.call_id.encode()).hexdigest()
    trace_id, span_id = digest[:32], digest[32:48]
    out: list[Event] = []
    clock = spec.start

    def add(kind: EventType, payload: dict[str, Any], advance: float = 0.0) -> None:
        nonlocal clock
        clock = clock + timedelta(seconds=advance)
        out.append(
            Event(
                call_id=spec.call_id,
                seq=len(out),
                type=kind,
                occurred_at=clock,
                trace_id=trace_id,
                span_id=span_id,
                payload=payload,
                instance="host:1",
            )
        )

    add(
        EventType.TRACE_CREATED,
        {
            "operation_name": spec.operation,
            "model": spec.model,
            "metadata": dict(spec.metadata),
            "estimated_input_tokens": spec.input_tokens,
            "max_output_tokens": 256,
            "reserved_tokens": spec.input_tokens + 256,
        },
    )
    attempts = 0
    if spec.outcome != "validation":
        add(
            EventType.GATE_WAIT,
            {"gate": "tpm", "attempt": 1, "waited_s": spec.tpm_wait_s, "waiters_ahead": 0},
            spec.tpm_wait_s,
        )
        add(
            EventType.SEMAPHORE_ACQUIRED,
            {"waited_s": spec.semaphore_wait_s, "in_flight": 1},
            spec.semaphore_wait_s,
        )
        n_attempts = len(spec.failures) + (0 if spec.outcome == "cancelled" else 1)
        for i in range(n_attempts):
            attempt = i + 1
            attempts = attempt
            add(
                EventType.GATE_WAIT,
                {
                    "gate": "rpm",
                    "attempt": attempt,
                    "waited_s": spec.rpm_wait_s,
                    "waiters_ahead": 2,
                },
                spec.rpm_wait_s,
            )
            add(EventType.SENT, {"attempt": attempt}, spec.step_s)
            last = attempt == n_attempts
            if last and spec.outcome == "succeeded":
                add(
                    EventType.RECEIVED,
                    {
                        "attempt": attempt,
                        "latency_s": spec.latency_s,
                        "status": 200,
                        "input_tokens": spec.input_tokens,
                        "cached_tokens": spec.cached_tokens,
                        "output_tokens": spec.output_tokens,
                        "reasoning_tokens": spec.reasoning_tokens,
                        "total_tokens": spec.input_tokens + spec.output_tokens,
                        "cost_usd": "0",
                    },
                    spec.latency_s,
                )
            else:
                error = spec.final_error if last else spec.failures[i]
                add(
                    EventType.ATTEMPT_FAILED,
                    {
                        "attempt": attempt,
                        "latency_s": spec.latency_s / 2,
                        "error_type": error,
                        "status": 429 if error == "rate_limited" else 500,
                        "retryable": not last,
                        "retry_after_s": 1.5 if error == "rate_limited" else None,
                        "message": f"attempt {attempt} failed: {error}",
                    },
                    spec.latency_s / 2,
                )
                if not last:
                    add(
                        EventType.RETRY_SCHEDULED,
                        {
                            "attempt": attempt,
                            "next_attempt": attempt + 1,
                            "wait_s": 1.0,
                            "reason": error,
                        },
                        1.0,
                    )
    if spec.outcome == "cancelled":
        add(EventType.UNMARKED, {"gate": "tpm", "attempt": 1, "amount": 10, "reason": "cancelled"})
    succeeded = spec.outcome == "succeeded"
    error_type = {
        "succeeded": None,
        "failed": spec.final_error,
        "cancelled": "cancelled",
        "validation": "validation",
    }[spec.outcome]
    add(
        EventType.COMPLETED,
        {
            "outcome": "failed" if spec.outcome == "validation" else spec.outcome,
            "error_type": error_type,
            "error_message": None if succeeded else f"the call {error_type}",
            "attempts": attempts,
            "input_tokens": spec.input_tokens if succeeded else 0,
            "cached_tokens": spec.cached_tokens if succeeded else 0,
            "output_tokens": spec.output_tokens if succeeded else 0,
            "reasoning_tokens": spec.reasoning_tokens if succeeded else 0,
            "model": spec.model,
            "rpm_wait_s": spec.rpm_wait_s * attempts,
            "tpm_wait_s": spec.tpm_wait_s,
            "semaphore_wait_s": spec.semaphore_wait_s,
            "latency_s": spec.latency_s,
            "total_s": 3.5,
        },
        0.01,
    )
    if not spec.complete:
        keep = len(out) - 1 if spec.cut is None else max(1, min(spec.cut, len(out) - 1))
        out = out[:keep]
    return out


def interleave(streams: Sequence[list[Event]], rng: random.Random) -> list[Event]:
    """One log holding every stream, each in its own order, the streams randomly interleaved."""
    cursors = [0] * len(streams)
    pending = [i for i, s in enumerate(streams) if s]
    out: list[Event] = []
    while pending:
        i = rng.choice(pending)
        out.append(streams[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(streams[i]):
            pending.remove(i)
    return out


def sample_specs() -> list[CallSpec]:
    """A small fixed population touching every branch of the folds."""
    return [
        CallSpec("c-ok-1", metadata={"tenant": "acme"}),
        CallSpec(
            "c-ok-2",
            metadata={"tenant": "globex"},
            model="gpt-4o",
            operation="summarise",
            start=T0 + timedelta(minutes=3),
        ),
        CallSpec(
            "c-retry",
            metadata={"tenant": "acme"},
            failures=("rate_limited", "server_error"),
            rpm_wait_s=2.5,
        ),
        CallSpec(
            "c-fail",
            metadata={"tenant": "acme"},
            outcome="failed",
            failures=("rate_limited",),
            final_error="rate_limited",
        ),
        CallSpec(
            "c-cancel", metadata={"tenant": "globex"}, outcome="cancelled", failures=("timeout",)
        ),
        CallSpec("c-invalid", outcome="validation"),
        CallSpec("c-unpriced", model="my-local-llama", metadata={"tenant": "acme"}),
        CallSpec("c-died", metadata={"tenant": "globex"}, complete=False),
    ]


def sample_log(seed: int = 7) -> list[Event]:
    return interleave([call_events(s) for s in sample_specs()], random.Random(seed))


# -- the store -------------------------------------------------------------------------------


class LogStore:
    """A migrated store, with the real :class:`~storage.EventWriter` appending to it."""

    def __init__(self, engine: Any, writer: Any) -> None:
        self.engine = engine
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> LogStore:
        from llmtrail.storage import open_store_sink
        from llmtrail.storage._engine import create_engine
        from llmtrail.storage._migrate import migrate

        engine = create_engine(url)
        await migrate(engine)
        writer = open_store_sink(url, batch_size=50)
        await writer.start()
        return cls(engine, writer)

    async def append(self, log: Sequence[Event]) -> None:
        """Write events in log order and wait until they are committed."""
        for event in log:
            while not self.writer.emit(event):
                await self.writer.wait_for_room()
        await self.writer.flush()

    async def aclose(self) -> None:
        await self.writer.aclose()
        await self.engine.dispose()


async def snapshot(engine: Any) -> dict[str, list[dict[str, Any]]]:
    """Every projection row, in key order: what "the same result" means."""
    from sqlalchemy import select

    from llmtrail.storage._projections import calls, metrics_minute, usage_daily

    out: dict[str, list[dict[str, Any]]] = {}
    async with engine.connect() as conn:
        for table in (calls, usage_daily, metrics_minute):
            order = [c for c in table.primary_key.columns]
            result = await conn.execute(select(table).order_by(*order))
            out[table.name] = [dict(row) for row in result.mappings()]
    return out

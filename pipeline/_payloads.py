"""The payloads of the call flow's events, built in one place from the flow's values.

Pure functions: each returns the typed payload (pipeline/_events.py) of one event type, so a
field added to a payload type is added here once, for every path that emits it (a plain call,
a streamed one, a call refused or failed before it started).

Invariants:
- Error text is redacted before it enters a payload (``redact_text``); money is a decimal
  string, or None when the model has no price.
- Prompt and response text enter only when ``capture_content`` is on.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from ._call import CallState, money
from ._errors import ErrorType
from ._events import (
    AttemptFailedPayload,
    CompletedPayload,
    GateWaitPayload,
    Outcome,
    ReceivedPayload,
    StreamedFields,
    TraceCreatedPayload,
    UnmarkedPayload,
)
from ._gates import GateReservation
from ._provider_types import ProviderResponse
from ._redact import redact_text
from ._types import GenerationRequest, Usage
from .typing import Provider

__all__ = ["attempt_failed", "completed", "gate_wait", "received", "trace_created"]


def trace_created(
    provider: Provider,
    resource: dict[str, str] | None,
    op: str,
    model: str,
    request: GenerationRequest | None = None,
    *,
    request_id: str | None = None,
    capture_content: bool = False,
    limits: dict[str, Any] | None = None,
    stream: bool = False,
    estimated_input_tokens: int = 0,
    reserved_tokens: int = 0,
    rpm_at_start: int = 0,
    tpm_at_start: int = 0,
    parent_span_id: str | None = None,
) -> TraceCreatedPayload:
    """``trace_created``; without ``request``, that of a call refused before it started."""
    created: TraceCreatedPayload = {
        "operation_name": op,
        "model": model,
        "request_id": request.request_id if request is not None else request_id,
        "metadata": dict(request.metadata) if request is not None else {},
        "estimated_input_tokens": estimated_input_tokens,
        "max_output_tokens": request.max_output_tokens if request is not None else None,
        "reserved_tokens": reserved_tokens,
        "rpm_at_start": rpm_at_start,
        "tpm_at_start": tpm_at_start,
        "parent_span_id": parent_span_id,
        "temperature": request.temperature if request is not None else None,
        "reasoning_effort": request.reasoning_effort if request is not None else None,
        "server_address": provider.server_address,
        "server_port": provider.server_port,
        "capture_content": capture_content and request is not None,
        "stream": stream,
        "api": getattr(provider, "api", "responses"),
        "output_type": None,
        "previous_response_id": None,
        "resource": resource,
    }
    if limits is not None:
        created["limits"] = limits
    if request is not None:
        created["output_type"] = "json" if request.response_schema is not None else None
        created["previous_response_id"] = request.previous_response_id
        if capture_content:
            # The system prompt is sent as the Responses API's `instructions`, not as input.
            created["instructions"] = request.system_prompt
            created["input"] = request.messages()[1 if request.system_prompt else 0 :]
    return created


def gate_wait(
    gate: Literal["rpm", "tpm"],
    attempt: int,
    amount: int,
    waited_s: float,
    reservation: GateReservation | None,
) -> GateWaitPayload:
    """``gate_wait``: ``waited_s`` may be 0; without a gate (no limit) nothing was ahead."""
    return {
        "gate": gate,
        "attempt": attempt,
        "amount": amount,
        "waited_s": waited_s,
        "waiters_ahead": reservation.waiters_ahead if reservation is not None else 0,
    }


def unmarked(
    gate: Literal["rpm", "tpm"], attempt: int, amount: int, reason: str
) -> UnmarkedPayload:
    """``unmarked``: ``amount`` units of ``gate`` given back; ``reason``: why."""
    return {"gate": gate, "attempt": attempt, "amount": amount, "reason": reason}


def attempt_failed(
    attempt: int,
    latency_s: float | None,
    error_type: ErrorType,
    message: str | None,
    *,
    status: int | None = None,
    retryable: bool = False,
    retry_after_s: float | None = None,
    provider_code: str | None = None,
    provider_request_id: str | None = None,
    rate_limits: dict[str, str] | None = None,
    body_sent_s: float | None = None,
    first_byte_s: float | None = None,
) -> AttemptFailedPayload:
    """``attempt_failed`` for attempt ``attempt``, which left (``body_sent_s``: None if never
    written, ``first_byte_s``: None if no answer's headers were read; a not-sent attempt's
    event is built by ``CallStream``)."""
    return {
        "attempt": attempt,
        "not_sent": False,
        "latency_s": latency_s,
        "error_type": str(error_type),
        "status": status,
        "retryable": retryable,
        "retry_after_s": retry_after_s,
        "message": redact_text(message) if message else message,
        "provider_code": provider_code,
        "provider_request_id": provider_request_id,
        "rate_limits": dict(rate_limits or {}),
        "body_sent_s": body_sent_s,
        "first_byte_s": first_byte_s,
    }


def received(
    attempt: int,
    latency_s: float,
    response: ProviderResponse,
    cost: Decimal | None,
    body_sent_s: float | None,
    first_byte_s: float | None,
    extra: StreamedFields | None,
    capture_content: bool,
) -> ReceivedPayload:
    """``received`` for the answer of attempt ``attempt`` (``extra``: a stream's fields)."""
    payload: ReceivedPayload = {
        "attempt": attempt,
        "latency_s": latency_s,
        "status": response.status,
        "response_id": response.response_id,
        "response_model": response.response_model,
        "finish_reasons": response.finish_reasons,
        "input_tokens": response.input_tokens,
        "cached_tokens": response.cached_tokens,
        "output_tokens": response.output_tokens,
        "reasoning_tokens": response.reasoning_tokens,
        "total_tokens": response.input_tokens + response.output_tokens,
        "cost_usd": money(cost),
        "provider_request_id": response.provider_request_id,
        "rate_limits": response.rate_limits,
        "service_tier": response.service_tier,
        "processing_s": response.processing_s,
        "body_sent_s": body_sent_s,
        "first_byte_s": first_byte_s,
    }
    if extra is not None:
        payload["streamed"] = extra["streamed"]
        payload["partial"] = extra["partial"]
        payload["usage_estimated"] = extra["usage_estimated"]
        payload["chunks"] = extra["chunks"]
    if capture_content:
        payload["content"] = response.raw_content
    return payload


def completed(
    outcome: Outcome,
    error_type: ErrorType | None,
    message: str | None,
    state: CallState,
    usage: Usage,
    model: str,
    response: ProviderResponse | None,
    total_s: float,
) -> CompletedPayload:
    """``completed``: always the call's last event (``message`` already redacted)."""
    return {
        "outcome": str(outcome),
        "error_type": str(error_type) if error_type else None,
        "error_message": message,
        "attempts": state.attempts,
        "input_tokens": usage.input_tokens,
        "cached_tokens": usage.cached_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "cost_usd": money(usage.cost_usd),
        "model": (response.response_model if response else None) or model,
        "response_id": response.response_id if response else None,
        "rpm_wait_s": state.rpm_wait,
        "tpm_wait_s": state.tpm_wait,
        "semaphore_wait_s": state.sem_wait,
        "latency_s": state.latency,
        "total_s": total_s,
    }

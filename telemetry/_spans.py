"""One call's lifecycle events -> its span tree; the one function used live and from the store.

Invariants:
- :func:`plan_call_spans` is a pure function of the events (their order within the call is
  taken from ``seq``). Called on the live stream by the tracing sink and on stored events by
  ``llmtrail traces export``, it gives the same tree: same ids, names, kinds, attributes,
  span events, statuses, start and end times.
- Ids come from the events, never from a random generator: the trace id and the call span id
  are the envelope's, a child's id is ``child_span_id(call_span_id, key)`` with the keys of
  :func:`child_key` (the pipeline uses the same keys when it parents the live HTTP span).
- Times are integers in ns since the epoch, computed from ``occurred_at`` (microseconds) and
  the payloads' ``waited_s`` with integer arithmetic where possible, so they are reproducible.
- A gate or semaphore wait gets a child span only when it lasted at least 1 ms
  (``MIN_WAIT_SPAN_NS``); every wait is on the call span's ``llmtrail.*_wait_s`` anyway.
- Prompt and response text appear only when ``trace_created.payload["capture_content"]`` is
  true; error messages pass through :func:`redact_text`, so no API key reaches a span.
- Prompt text goes to ``gen_ai.input.messages`` and the system prompt (``instructions``) to
  ``gen_ai.system_instructions``, both in the GenAI conventions' JSON shape (role + parts).
- Status descriptions say what went wrong without the HTTP code, which is on the span as
  ``http.response.status_code`` already.
- :func:`record_spans` creates real SDK spans with exactly the planned ids through the public
  Tracer API, with an :class:`IdGenerator` that hands out preset ids. It is installed on
  llmtrail's own tracer only, and falls back to the provider's generator otherwise. It is the
  one way spans are made: by the live sink and by ``traces export``.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import attrgetter
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from llmtrail.pipeline import Event, EventType, child_span_id

from . import _attributes as A
from ._metrics import scope_version
from ._redact import redact_text

__all__ = [
    "CALL_CONSTANTS",
    "IncompleteCallError",
    "SpanEvent",
    "SpanPlan",
    "call_span_name",
    "child_key",
    "llmtrail_tracer",
    "plan_call_spans",
    "record_spans",
    "to_ns",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Attributes = dict[str, AttributeValue]


# Gate and semaphore waits shorter than this get no span of their own (see plan_call_spans).
MIN_WAIT_SPAN_NS = 1_000_000


class IncompleteCallError(ValueError):
    """The events of a call do not start with ``trace_created`` or end with ``completed``."""


def child_key(kind: str, attempt: int | None = None) -> str:
    """The name a child span id is derived from: ``rpm gate/{n}``, ``tpm gate``,
    ``semaphore`` (``semaphore/{n}`` for a retry's permit) or ``attempt/{n}`` (the pipeline
    derives the live HTTP parent the same way).
    """
    if kind == A.SPAN_RPM_GATE:
        return f"{A.SPAN_RPM_GATE}/{attempt}"
    if kind == "attempt":
        return f"attempt/{attempt}"
    return kind


def to_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exact for microsecond datetimes (no float rounding)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1_000


def _seconds_ns(seconds: Any) -> int:
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        return round(seconds * 1e9)
    return 0


@dataclass(slots=True, frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Attributes


@dataclass(slots=True)
class SpanPlan:
    """Everything needed to create one span, as plain data (ids in hex)."""

    name: str
    span_id: str
    parent_id: str | None
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: Attributes = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    error: str | None = None  # status ERROR with this description; None leaves it UNSET


def _put(attrs: Attributes, key: str, value: Any) -> None:
    """Set an attribute when the value is known and of a type OTel accepts."""
    if value is None:
        return
    if isinstance(value, bool | str | int | float):
        attrs[key] = value
    elif isinstance(value, Decimal):
        attrs[key] = float(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        attrs[key] = tuple(value)


def _cost(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        return None


def _message_parts(messages: Any) -> str:
    """Messages in the GenAI semconv shape (role + text parts), as the JSON string OTel wants."""
    out: list[dict[str, Any]] = []
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                out.append(
                    {
                        "role": message.get("role", "user"),
                        "parts": [{"type": "text", "content": content}],
                    }
                )
    return json.dumps(out, ensure_ascii=False, default=str)


def _instruction_parts(instructions: str) -> str:
    """The system prompt as ``gen_ai.system_instructions`` wants it: a JSON list of parts."""
    return json.dumps([{"type": "text", "content": instructions}], ensure_ascii=False)


# "HTTP 429: " at the start of a provider error message: the span says it already.
_HTTP_PREFIX = re.compile(r"^HTTP \d{3}: ")


def _description(message: Any, fallback: str) -> str:
    """A status description: the error's own words, masked, without the HTTP code."""
    text = _HTTP_PREFIX.sub("", str(message)) if message else ""
    return redact_text(text or fallback)


def _output_parts(content: Any, finish_reasons: Any) -> str:
    text = content if isinstance(content, str) else json.dumps(content, default=str)
    message: dict[str, Any] = {"role": "assistant", "parts": [{"type": "text", "content": text}]}
    if isinstance(finish_reasons, list) and finish_reasons:
        message["finish_reason"] = finish_reasons[0]
    return json.dumps([message], ensure_ascii=False, default=str)


_SEQ = attrgetter("seq")

# The call span's attributes that are the same on every call, built once.
CALL_CONSTANTS: Attributes = {
    A.GEN_AI_OPERATION_NAME: A.OPERATION_CHAT,
    A.GEN_AI_PROVIDER_NAME: A.PROVIDER_OPENAI,
}


def call_span_name(model: Any) -> str:
    """The call span's name, per the GenAI conventions: ``chat {model}``."""
    return f"{A.OPERATION_CHAT} {model}"


def plan_call_spans(events: Iterable[Event]) -> list[SpanPlan]:
    """The span tree of one completed call: the CLIENT call span first, then its children.

    Raises :class:`IncompleteCallError` when the stream lacks ``trace_created`` or
    ``completed`` (a call still in flight, or one whose process died).
    """
    stream = sorted(events, key=_SEQ)
    if not stream or stream[0].type is not EventType.TRACE_CREATED:
        call_id = stream[0].call_id if stream else "?"
        raise IncompleteCallError(
            f"call {call_id} has no trace_created event; only complete streams can be traced"
        )
    if stream[-1].type is not EventType.COMPLETED:
        raise IncompleteCallError(
            f"call {stream[0].call_id} has no completed event yet; "
            "export it after it finishes (or it was interrupted)"
        )
    created, completed = stream[0], stream[-1]
    start = created.payload
    end = completed.payload
    call_span_id = created.span_id
    capture = bool(start.get("capture_content"))

    model = start.get("model") or end.get("model") or "unknown"
    attrs: Attributes = dict(CALL_CONSTANTS)
    attrs[A.OPENAI_API_TYPE] = A.api_type(start.get("api"))
    _put(attrs, A.GEN_AI_REQUEST_MODEL, model)
    _put(attrs, A.GEN_AI_OUTPUT_TYPE, start.get("output_type"))
    # A response chained on an earlier one continues that conversation.
    _put(attrs, A.GEN_AI_CONVERSATION_ID, start.get("previous_response_id"))
    _put(attrs, A.GEN_AI_REQUEST_MAX_TOKENS, start.get("max_output_tokens"))
    _put(attrs, A.GEN_AI_REQUEST_TEMPERATURE, start.get("temperature"))
    _put(attrs, A.SERVER_ADDRESS, start.get("server_address"))
    _put(attrs, A.SERVER_PORT, start.get("server_port"))
    _put(attrs, A.LLMTRAIL_CALL_ID, created.call_id)
    _put(attrs, A.LLMTRAIL_OPERATION_NAME, start.get("operation_name"))
    _put(attrs, A.LLMTRAIL_REQUEST_ID, start.get("request_id"))
    _put(attrs, A.LLMTRAIL_REASONING_EFFORT, start.get("reasoning_effort"))
    if start.get("stream"):
        attrs[A.GEN_AI_REQUEST_STREAM] = True
    metadata = start.get("metadata") or {}
    if isinstance(metadata, dict):
        for key in sorted(metadata):
            _put(attrs, A.LLMTRAIL_METADATA_PREFIX + str(key), redact_text(str(metadata[key])))
    if capture and start.get("input") is not None:
        attrs[A.GEN_AI_INPUT_MESSAGES] = _message_parts(start.get("input"))
    if capture and isinstance(start.get("instructions"), str):
        attrs[A.GEN_AI_SYSTEM_INSTRUCTIONS] = _instruction_parts(start["instructions"])

    call = SpanPlan(
        name=call_span_name(model),
        span_id=call_span_id,
        parent_id=start.get("parent_span_id") or None,
        kind=SpanKind.CLIENT,
        start_ns=to_ns(created.occurred_at),
        end_ns=to_ns(completed.occurred_at),
        attributes=attrs,
    )
    children: list[SpanPlan] = []
    attempts: dict[int, SpanPlan] = {}
    last_received: dict[str, Any] | None = None

    def attempt_span(n: int, at_ns: int) -> SpanPlan:
        plan = attempts.get(n)
        if plan is None:
            plan = SpanPlan(
                name=A.SPAN_ATTEMPT.format(n=n),
                span_id=child_span_id(call_span_id, child_key("attempt", n)),
                parent_id=call_span_id,
                kind=SpanKind.INTERNAL,
                start_ns=at_ns,
                end_ns=at_ns,
                attributes={A.LLMTRAIL_ATTEMPT: n},
            )
            attempts[n] = plan
            children.append(plan)
        return plan

    for event in stream[1:-1]:
        p = event.payload
        at = to_ns(event.occurred_at)
        if event.type is EventType.GATE_WAIT or event.type is EventType.SEMAPHORE_ACQUIRED:
            waited = _seconds_ns(p.get("waited_s"))
            if waited < MIN_WAIT_SPAN_NS:
                # Only a real wait gets a span. An uncontended acquire still measures a few
                # microseconds; a span for it on every call would double the export volume
                # and say nothing the call span's wait attributes don't.
                continue
            if event.type is EventType.SEMAPHORE_ACQUIRED:
                # One permit per attempt: the first keeps the plain key, retries get their own.
                sem_attempt = p.get("attempt") or 1
                name = A.SPAN_SEMAPHORE
                key = A.SPAN_SEMAPHORE if sem_attempt == 1 else child_key(name, sem_attempt)
                span_attrs: Attributes = {}
                _put(span_attrs, A.LLMTRAIL_ATTEMPT, sem_attempt)
                _put(span_attrs, A.LLMTRAIL_IN_FLIGHT, p.get("in_flight"))
            elif p.get("gate") == "rpm":
                name, key = A.SPAN_RPM_GATE, child_key(A.SPAN_RPM_GATE, p.get("attempt") or 1)
                span_attrs = {A.LLMTRAIL_GATE: "rpm"}
                _put(span_attrs, A.LLMTRAIL_ATTEMPT, p.get("attempt"))
                _put(span_attrs, A.LLMTRAIL_AMOUNT, p.get("amount"))
            else:
                name, key = A.SPAN_TPM_GATE, A.SPAN_TPM_GATE
                span_attrs = {A.LLMTRAIL_GATE: "tpm"}
                _put(span_attrs, A.LLMTRAIL_AMOUNT, p.get("amount"))
            _put(span_attrs, A.LLMTRAIL_WAITERS_AHEAD, p.get("waiters_ahead"))
            children.append(
                SpanPlan(
                    name=name,
                    span_id=child_span_id(call_span_id, key),
                    parent_id=call_span_id,
                    kind=SpanKind.INTERNAL,
                    start_ns=at - waited,
                    end_ns=at,
                    attributes=span_attrs,
                )
            )
        elif event.type is EventType.SENT:
            plan = attempt_span(int(p.get("attempt") or 1), at)
            plan.start_ns = at
            plan.end_ns = at
        elif event.type is EventType.RECEIVED or event.type is EventType.ATTEMPT_FAILED:
            plan = attempt_span(int(p.get("attempt") or 1), at)
            plan.end_ns = max(at, plan.start_ns)
            a = plan.attributes
            _put(a, A.HTTP_RESPONSE_STATUS_CODE, p.get("status"))
            _put(a, A.LLMTRAIL_PROVIDER_REQUEST_ID, p.get("provider_request_id"))
            if event.type is EventType.RECEIVED:
                last_received = p
                # A stream cut short still delivered (and billed) part of an answer.
                a[A.LLMTRAIL_OUTCOME] = "partial" if p.get("partial") else "succeeded"
            else:
                error_type = p.get("error_type") or "error"
                a[A.LLMTRAIL_OUTCOME] = "cancelled" if error_type == "cancelled" else "failed"
                _put(a, A.ERROR_TYPE, error_type)
                _put(a, A.LLMTRAIL_RETRYABLE, p.get("retryable"))
                _put(a, A.LLMTRAIL_RETRY_AFTER_S, p.get("retry_after_s"))
                _put(a, A.LLMTRAIL_PROVIDER_CODE, p.get("provider_code"))
                plan.error = _description(p.get("message"), error_type)
        elif event.type is EventType.FIRST_TOKEN:
            # Time to first chunk as the caller saw it (from the call's start), per GenAI
            # semconv; the provider's own (from the send) on the attempt's span event.
            _put(attrs, A.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, p.get("call_ttft_s"))
            ttft_attrs: Attributes = {}
            _put(ttft_attrs, A.LLMTRAIL_TTFT_S, p.get("ttft_s"))
            plan = attempt_span(int(p.get("attempt") or 1), at)
            plan.events.append(SpanEvent(A.EVENT_FIRST_TOKEN, at, ttft_attrs))
        elif event.type is EventType.RETRY_SCHEDULED:
            failed = int(p.get("attempt") or 1)
            ev_attrs: Attributes = {}
            _put(ev_attrs, A.LLMTRAIL_NEXT_ATTEMPT, p.get("next_attempt"))
            _put(ev_attrs, A.LLMTRAIL_WAIT_S, p.get("wait_s"))
            _put(ev_attrs, A.LLMTRAIL_REASON, p.get("reason"))
            _put(ev_attrs, A.LLMTRAIL_RETRY_AFTER_S, p.get("retry_after_s"))
            target = attempts.get(failed, call)
            target.events.append(SpanEvent(A.EVENT_RETRY_SCHEDULED, at, ev_attrs))
        elif event.type is EventType.UNMARKED:
            ev_attrs = {}
            _put(ev_attrs, A.LLMTRAIL_GATE, p.get("gate"))
            _put(ev_attrs, A.LLMTRAIL_ATTEMPT, p.get("attempt"))
            _put(ev_attrs, A.LLMTRAIL_AMOUNT, p.get("amount"))
            _put(ev_attrs, A.LLMTRAIL_REASON, p.get("reason"))
            # An rpm slot belongs to one attempt; the tpm reservation belongs to the call.
            target = call
            if p.get("gate") == "rpm":
                target = attempts.get(int(p.get("attempt") or 1), call)
            target.events.append(SpanEvent(A.EVENT_UNMARKED, at, ev_attrs))

    # An attempt that was sent but has no result cannot come from the pipeline (it always
    # emits attempt_failed, even on cancellation); close it at the call's end all the same.
    for plan in attempts.values():
        if A.LLMTRAIL_OUTCOME not in plan.attributes:
            plan.end_ns = max(call.end_ns, plan.start_ns)
            plan.attributes[A.LLMTRAIL_OUTCOME] = "unknown"

    outcome = end.get("outcome") or "failed"
    _put(attrs, A.LLMTRAIL_OUTCOME, outcome)
    _put(attrs, A.LLMTRAIL_ATTEMPTS, end.get("attempts"))
    _put(attrs, A.LLMTRAIL_RPM_WAIT_S, end.get("rpm_wait_s"))
    _put(attrs, A.LLMTRAIL_TPM_WAIT_S, end.get("tpm_wait_s"))
    _put(attrs, A.LLMTRAIL_SEMAPHORE_WAIT_S, end.get("semaphore_wait_s"))
    response = last_received or {}
    _put(attrs, A.GEN_AI_RESPONSE_MODEL, response.get("response_model"))
    _put(attrs, A.GEN_AI_RESPONSE_ID, end.get("response_id") or response.get("response_id"))
    _put(attrs, A.GEN_AI_RESPONSE_FINISH_REASONS, response.get("finish_reasons"))
    _put(attrs, A.OPENAI_RESPONSE_SERVICE_TIER, response.get("service_tier"))
    if outcome == "succeeded" or last_received is not None:
        _put(attrs, A.GEN_AI_USAGE_INPUT_TOKENS, end.get("input_tokens"))
        _put(attrs, A.GEN_AI_USAGE_OUTPUT_TOKENS, end.get("output_tokens"))
        _put(attrs, A.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, end.get("cached_tokens"))
        _put(attrs, A.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, end.get("reasoning_tokens"))
        _put(attrs, A.LLMTRAIL_COST_USD, _cost(end.get("cost_usd")))
    if capture and "content" in response:
        attrs[A.GEN_AI_OUTPUT_MESSAGES] = _output_parts(
            response.get("content"), response.get("finish_reasons")
        )
    if outcome != "succeeded":
        error_type = end.get("error_type") or outcome
        _put(attrs, A.ERROR_TYPE, error_type)
        call.error = _description(end.get("error_message"), error_type)
    return [call, *children]


# The ids the next span started by llmtrail's tracer must get: (trace_id, span_id). A
# contextvar, not an attribute, because sinks may build spans from several threads at once.
_PRESET_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "llmtrail_preset_span_ids", default=None
)


_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)


class _PresetIdGenerator(IdGenerator):
    """Hands out the preset ids while :func:`record_spans` runs, else defers to ``fallback``."""

    def __init__(self, fallback: IdGenerator) -> None:
        self._fallback = fallback

    def generate_span_id(self) -> int:
        preset = _PRESET_IDS.get()
        return preset[1] if preset is not None else self._fallback.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = _PRESET_IDS.get()
        return preset[0] if preset is not None else self._fallback.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        # Trace ids may be inherited from a caller whose ids are not random; claiming W3C
        # "random" for them would be wrong, and the flag must not differ between live and
        # rebuilt spans.
        return False


def llmtrail_tracer(provider: TracerProvider) -> Tracer:
    """llmtrail's own tracer on ``provider``, able to create spans with preset ids.

    The provider caches one tracer per instrumentation scope; only that tracer's id generator
    is replaced, so the user's other tracers on the same provider keep theirs.
    """
    tracer = provider.get_tracer(A.INSTRUMENTATION_SCOPE, scope_version(), A.SCHEMA_URL)
    if not isinstance(tracer, Tracer):
        # A disabled provider (OTEL_SDK_DISABLED) returns a NoOpTracer.
        raise TypeError(f"{provider!r} gave a {type(tracer).__name__}, not an SDK Tracer")
    if not isinstance(tracer.id_generator, _PresetIdGenerator):
        tracer.id_generator = _PresetIdGenerator(tracer.id_generator)
    return tracer


def _start(tracer: Tracer, plan: SpanPlan, trace_id: int, context: Context) -> trace.Span:
    token = _PRESET_IDS.set((trace_id, int(plan.span_id, 16)))
    try:
        span = tracer.start_span(
            plan.name,
            context=context,
            kind=plan.kind,
            attributes=plan.attributes,
            start_time=plan.start_ns,
        )
    finally:
        _PRESET_IDS.reset(token)
    for span_event in plan.events:
        span.add_event(span_event.name, span_event.attributes, timestamp=span_event.time_ns)
    if plan.error is not None:
        span.set_status(Status(StatusCode.ERROR, plan.error))
    return span


def record_spans(tracer: Tracer, trace_id: str, plans: Sequence[SpanPlan]) -> int:
    """Create and end the planned spans on ``tracer`` (children under the first); return
    how many were recorded (0 when the sampler dropped the call)."""
    if not plans:
        return 0
    trace_int = int(trace_id, 16)
    root_plan, *child_plans = plans
    if root_plan.parent_id:
        caller = SpanContext(
            trace_int, int(root_plan.parent_id, 16), is_remote=False, trace_flags=_SAMPLED
        )
        context = trace.set_span_in_context(NonRecordingSpan(caller))
    else:
        # An empty context, not None: None would make whatever span is current in the
        # emitting task the parent, and the rebuilt tree would differ from the live one.
        context = Context()
    root = _start(tracer, root_plan, trace_int, context)
    # Children are parented on the real call span, so a sampler that dropped the call drops
    # its children too (ParentBased), instead of exporting orphans.
    under_root = trace.set_span_in_context(root)
    for plan in child_plans:
        _start(tracer, plan, trace_int, under_root).end(end_time=plan.end_ns)
    root.end(end_time=root_plan.end_ns)
    return len(plans) if root.get_span_context().trace_flags.sampled else 0

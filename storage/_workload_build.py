"""Folding recorded events into a :class:`~storage._workload.Workload`.

Two readers feed the same :class:`WorkloadBuilder`, so they cannot disagree:
- ``extract_workload`` folds any iterable of :class:`pipeline.Event` (tests, other stores);
- ``load_workload`` reads the SQL event store with one query per event type, reading only the
  columns and types it needs (both in :mod:`storage._workload_read`).

Invariants:
- Each event type contributes exactly the payload fields in ``FIELDS``, in that order; a field
  an older row lacks reads as None.
- An attempt's provider time is, in order of preference: its answer's headers read minus its
  body written (``first_byte_s - body_sent_s``, both measured by the client's transport: the
  provider's time plus the network's, without the client's work before the write or after the
  headers); else the provider's ``openai-processing-ms``; else None (a replay then takes the
  recorded latency). A streamed answer's provider time runs to the end of the stream (the
  provider sends its chunks as it writes them): its latency minus ``body_sent_s``.
- An attempt's send time is its answer's (or failure's) time minus its measured latency; its
  ``sent`` event comes before that, by the write-ahead commit of the event (``pre_send_s``).
- A 429 is a limit 429 when its remaining-requests/-tokens headers showed no room for the
  request, or it carried none (see :class:`~storage._workload.RecordedAttempt`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from llmtrail.pipeline import ErrorType, EventType
from llmtrail.pipeline._gates import parse_reset

from ._workload import (
    EmptyWorkloadError,
    ProviderLimits,
    RecordedAttempt,
    RecordedCall,
    RecordedSettings,
    Workload,
)

__all__ = ["FIELDS", "WorkloadBuilder", "pick"]

_RATE_LIMITED = str(ErrorType.RATE_LIMITED)
_LIMIT_KEYS = (
    "max_rpm",
    "max_tpm",
    "window_s",
    "max_concurrent_requests",
    "max_attempts",
    "default_max_output_tokens",
    "send_guard_s",
    "unanswered_guard_s",
    "arrival_guard_s",
)
# Limits whose recorded None means "off" rather than "not recorded".
_NONE_MEANS_OFF = frozenset({"max_rpm", "max_tpm", "send_guard_s"})
_UNLIMITED = 1_000_000_000  # a stated limit this high means none (the local server's "none")


class _Created(NamedTuple):
    at: float
    operation: str
    model: str
    estimated_input_tokens: int
    max_output_tokens: int | None
    reserved_tokens: int
    limits: tuple[Any, ...] | None


class _Result(NamedTuple):
    attempt: int
    sent_at: float  # the answer's time minus the latency: when the attempt was sent
    latency_s: float
    error_type: str | None  # None: answered
    retry_after_s: float | None
    status: int | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    response_model: str | None
    provider_s: float | None = None
    room: tuple[int | None, int | None] = (None, None)  # remaining requests, tokens (429s)
    retryable: bool = True
    body_sent_s: float | None = None


class _Done(NamedTuple):
    at: float
    outcome: str
    error_type: str | None
    model: str | None
    total_s: float | None
    rpm_wait_s: float
    tpm_wait_s: float
    semaphore_wait_s: float


# What the provider states about its limits, on every answer (429s included).
_LIMIT_HEADERS = (
    "rate_limits.x-ratelimit-limit-requests",
    "rate_limits.x-ratelimit-limit-tokens",
    "rate_limits.x-ratelimit-reset-requests",
)

# The payload fields each event type contributes, as paths ("limits.max_rpm" is nested). Both
# readers pull exactly these, in this order, so the builder sees one shape whatever the source.
FIELDS: dict[str, tuple[str, ...]] = {
    str(EventType.TRACE_CREATED): (
        "operation_name",
        "model",
        "estimated_input_tokens",
        "max_output_tokens",
        "reserved_tokens",
        *(f"limits.{key}" for key in _LIMIT_KEYS),
    ),
    str(EventType.RECEIVED): (
        "attempt",
        "latency_s",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "response_model",
        "processing_s",
        *_LIMIT_HEADERS,
        "streamed",
        "body_sent_s",
        "first_byte_s",
    ),
    str(EventType.ATTEMPT_FAILED): (
        "attempt",
        "latency_s",
        "error_type",
        "retry_after_s",
        "status",
        "retryable",
        "rate_limits.x-ratelimit-remaining-requests",
        "rate_limits.x-ratelimit-remaining-tokens",
        *_LIMIT_HEADERS,
        "body_sent_s",
        "first_byte_s",
    ),
    str(EventType.SENT): ("attempt",),
    str(EventType.RETRY_SCHEDULED): ("attempt", "wait_s"),
    str(EventType.UNMARKED): ("gate", "attempt", "reason"),
    str(EventType.COMPLETED): (
        "outcome",
        "error_type",
        "model",
        "total_s",
        "rpm_wait_s",
        "tpm_wait_s",
        "semaphore_wait_s",
    ),
}

Row = tuple[str, float, Sequence[Any]]  # call_id, occurred_at (epoch seconds), FIELDS values
_Step = Callable[[Iterable[Row]], None]


def pick(payload: dict[str, Any], paths: Sequence[str]) -> list[Any]:
    """The values at ``paths`` in ``payload`` (None where absent): what SQL extracts."""
    values: list[Any] = []
    for path in paths:
        value: Any = payload
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return values


class WorkloadBuilder:
    """Collects the facts of calls from events of any type, in any order, and builds the
    :class:`Workload`. Readers feed ``add(type, rows)``, rows being
    ``(call_id, occurred_at_epoch_s, values)`` with the values of ``FIELDS[type]``.

    Facts are kept in flat dicts of plain tuples keyed by call_id (see the module docs: no
    per-call objects for the garbage collector to rescan); the rare second attempt, retry
    and refused connection go to small side dicts.
    """

    def __init__(self) -> None:
        self._created: dict[str, _Created] = {}
        self._result: dict[str, _Result] = {}  # the first result seen
        self._results_more: dict[str, list[_Result]] = {}  # further results
        self._sent: dict[str, float] = {}  # the first attempt's `sent` event
        self._sent_more: dict[tuple[str, int], float] = {}  # retries'
        self._waits: dict[tuple[str, int], float] = {}
        self._unreached: set[tuple[str, int]] = set()
        self._done: dict[str, _Done] = {}
        self._stated: list[float] = [0.0, 0.0, 0.0]  # the largest rpm, tpm, reset stated
        self._kinds: dict[str, _Step] = {
            str(EventType.TRACE_CREATED): self._on_created,
            str(EventType.RECEIVED): self._on_received,
            str(EventType.ATTEMPT_FAILED): self._on_failed,
            str(EventType.SENT): self._on_sent,
            str(EventType.RETRY_SCHEDULED): self._on_retry,
            str(EventType.UNMARKED): self._on_unmarked,
            str(EventType.COMPLETED): self._on_completed,
        }

    def __len__(self) -> int:
        return len(self._created)

    def add(self, kind: str, rows: Iterable[Row]) -> None:
        """Fold rows of one event type (types the replay does not need are ignored)."""
        step = self._kinds.get(kind)
        if step is not None:
            step(rows)

    # The steps are loops over rows, not calls per row: this is the hot path of extraction.

    def _on_created(self, rows: Iterable[Row]) -> None:
        created = self._created
        for call_id, at, (op, model, est, max_out, reserved, *limits) in rows:
            created[call_id] = _Created(
                at,
                op or "generation",
                model or "",
                est or 0,
                max_out,
                reserved or 0,
                tuple(limits) if any(v is not None for v in limits) else None,
            )

    def _add_result(self, call_id: str, result: _Result) -> None:
        if call_id not in self._result:
            self._result[call_id] = result
        else:
            self._results_more.setdefault(call_id, []).append(result)

    def _state(self, rpm: Any, tpm: Any, reset: Any) -> None:
        """Keep the largest limits and reset the provider stated (header text)."""
        stated = self._stated
        for i, value in enumerate((_number(rpm), _number(tpm), parse_reset(reset))):
            if value is not None and value > stated[i]:
                stated[i] = value

    def _on_received(self, rows: Iterable[Row]) -> None:
        first, add, state = self._result, self._add_result, self._state
        for call_id, at, values in rows:
            attempt, latency, inp, cached, out, reasoning, rmodel, processing = values[:8]
            if values[8] is not None or values[9] is not None:
                state(*values[8:11])
            latency = latency or 0.0
            streamed, sent, first_byte = values[-3:]
            if sent is None:  # no send-time hook: the provider's header, if it said
                provider = processing
            elif streamed:  # the stream lasts as long as the provider writes it
                provider = max(latency - sent, 0.0)
            else:
                provider = processing if first_byte is None else max(first_byte - sent, 0.0)
            result = _Result(
                attempt or 1,
                at - latency,
                latency,
                None,
                None,
                200,
                inp or 0,
                cached or 0,
                out or 0,
                reasoning or 0,
                rmodel,
                provider,
                body_sent_s=sent,
            )
            if call_id in first:
                add(call_id, result)
            else:
                first[call_id] = result

    def _on_failed(self, rows: Iterable[Row]) -> None:
        for call_id, at, values in rows:
            attempt, latency, error, retry_after, status, retryable, left_r, left_t = values[:8]
            if values[8] is not None or values[9] is not None:
                self._state(*values[8:11])
            sent, first_byte = values[-2:]
            self._add_result(
                call_id,
                _Result(
                    attempt or 1,
                    at - (latency or 0.0),
                    latency or 0.0,
                    error or "unknown",
                    retry_after,
                    status,
                    0,
                    0,
                    0,
                    0,
                    None,
                    None if sent is None or first_byte is None else max(first_byte - sent, 0.0),
                    (_number(left_r), _number(left_t)),
                    retryable is not False,
                    sent,
                ),
            )

    def _on_sent(self, rows: Iterable[Row]) -> None:
        sent, more = self._sent, self._sent_more
        for call_id, at, (attempt,) in rows:
            if attempt in (1, None):
                sent[call_id] = at
            else:
                more[call_id, attempt] = at

    def _pre_send(self, call_id: str, result: _Result) -> float:
        """From the attempt's ``sent`` event to its send (0.0 when the event was not read), to
        the microsecond: the store's timestamps are no finer."""
        n = result.attempt
        at = self._sent.get(call_id) if n == 1 else self._sent_more.get((call_id, n))
        return 0.0 if at is None or at >= result.sent_at else round(result.sent_at - at, 6)

    def _on_retry(self, rows: Iterable[Row]) -> None:
        for call_id, _, (attempt, wait) in rows:
            self._waits[call_id, attempt or 1] = wait or 0.0

    def _on_unmarked(self, rows: Iterable[Row]) -> None:
        for call_id, _, (gate, attempt, reason) in rows:
            if gate == "rpm" and reason == "connection_refused":
                self._unreached.add((call_id, attempt or 1))

    def _on_completed(self, rows: Iterable[Row]) -> None:
        done = self._done
        for call_id, at, (outcome, error, model, total, rpm_w, tpm_w, sem_w) in rows:
            done[call_id] = _Done(
                at,
                outcome or "failed",
                error,
                model,
                total,
                rpm_w or 0.0,
                tpm_w or 0.0,
                sem_w or 0.0,
            )

    def build(self) -> Workload:
        """The workload, sorted by arrival; raises :class:`EmptyWorkloadError` if empty."""
        created, done = self._created, self._done
        ids = [cid for cid in created if cid in done]
        incomplete = len(created) - len(ids)
        if not ids:
            raise EmptyWorkloadError(
                "no completed call to replay"
                + (f" ({incomplete} calls have not completed)" if incomplete else "")
            )
        ids.sort(key=lambda cid: created[cid].at)
        t0 = created[ids[0]].at
        variants: Counter[tuple[Any, ...]] = Counter(
            limits for cid in ids if (limits := created[cid].limits) is not None
        )
        settings = RecordedSettings()
        if variants:
            raw = dict(zip(_LIMIT_KEYS, variants.most_common(1)[0][0], strict=True))
            settings = RecordedSettings(
                **{k: v for k, v in raw.items() if v is not None or k in _NONE_MEANS_OFF}
            )
        finish = self._finish
        calls = [finish(cid, created[cid], done[cid], t0) for cid in ids]
        rpm, tpm, reset = self._stated
        stated: ProviderLimits | None = None
        if rpm or tpm:
            stated = ProviderLimits(
                int(rpm) if 0 < rpm < _UNLIMITED else None,
                int(tpm) if 0 < tpm < _UNLIMITED else None,
                math.ceil(reset * 10 - 1e-6) / 10 if reset > 0 else None,
            )
        return Workload(
            calls,
            datetime.fromtimestamp(t0, UTC),
            settings,
            settings_variants=max(len(variants), 1),
            incomplete=incomplete,
            provider_limits=stated,
        )

    def _finish(self, call_id: str, c: _Created, done: _Done, t0: float) -> RecordedCall:
        first_result = self._result.get(call_id)
        results = [] if first_result is None else [first_result]
        more = self._results_more.get(call_id)
        if more:
            results = sorted(results + more)
        waits, unreached = self._waits, self._unreached
        counted = c.estimated_input_tokens + (c.max_output_tokens or 0)
        if not waits and not unreached and len(results) == 1 and results[0].error_type is None:
            r = results[0]  # the common case, fast
            attempts: tuple[RecordedAttempt, ...] = (
                RecordedAttempt(
                    r.latency_s,
                    None,
                    None,
                    True,
                    True,
                    None,
                    r.provider_s,
                    r.status,
                    body_sent_s=r.body_sent_s,
                    pre_send_s=self._pre_send(call_id, r),
                ),
            )
        else:
            attempts = tuple(
                [
                    RecordedAttempt(
                        r.latency_s,
                        r.error_type,
                        r.retry_after_s,
                        (call_id, r.attempt) not in unreached,
                        r.status is not None,
                        waits.get((call_id, r.attempt)),
                        r.provider_s,
                        r.status,
                        r.status == 429 and r.error_type == _RATE_LIMITED and _no_room(r, counted),
                        r.retryable,
                        r.body_sent_s,
                        self._pre_send(call_id, r),
                    )
                    for r in results
                ]
            )
        answer = None
        for r in results:
            if r.error_type is None:
                answer = r
                break
        max_out = c.max_output_tokens
        input_t = cached_t = output_t = reasoning_t = 0
        response_model: str | None = None
        if answer is not None:
            input_t, cached_t = answer.input_tokens, answer.cached_tokens
            output_t, reasoning_t = answer.output_tokens, answer.reasoning_tokens
            # `completed.model` is the answering model when there was an answer.
            response_model = answer.response_model or done.model
        retry_gate: tuple[tuple[float, float], ...] = ()
        if len(attempts) > 1:
            retry_gate = self._retry_gate_waits(results, attempts, t0)
        first = results[0].sent_at if results else None
        return RecordedCall(
            call_id,
            c.at - t0,
            c.operation,
            c.model or done.model or "",
            response_model,
            c.estimated_input_tokens,
            max_out,
            c.reserved_tokens,
            input_t,
            cached_t,
            output_t,
            reasoning_t,
            input_t + (max_out or output_t),
            attempts,
            done.outcome,
            done.error_type,
            None if first is None else first - t0,
            done.at - t0,
            done.total_s if done.total_s is not None else done.at - c.at,
            done.rpm_wait_s,
            done.tpm_wait_s,
            done.semaphore_wait_s,
            retry_gate,
        )

    @staticmethod
    def _retry_gate_waits(
        results: list[_Result], attempts: tuple[RecordedAttempt, ...], t0: float
    ) -> tuple[tuple[float, float], ...]:
        """The RPM waits of retries: from the end of the retry wait to the next send."""
        waits = []
        for before, after, attempt in zip(results, results[1:], attempts, strict=False):
            if attempt.wait_s is None:
                continue
            ready = before.sent_at + attempt.latency_s + attempt.wait_s
            if after.sent_at > ready:
                waits.append((ready - t0, after.sent_at - t0))
        return tuple(waits)


def _number(value: Any) -> int | None:
    """A header's integer (they are text), None when absent or not a number."""
    if value is None:
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _no_room(result: _Result, tokens: int) -> bool:
    """Did the 429's headers show no room for the request? (No headers: taken as yes.)"""
    requests, left_tokens = result.room
    if requests is None and left_tokens is None:
        return True
    return (requests is not None and requests <= 0) or (
        left_tokens is not None and left_tokens < tokens
    )

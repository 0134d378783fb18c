"""The projections as pure folds over stored events: no I/O, no clock, no SQL.

A projection's state is a set of rows. Applying a batch of events is a *left fold*: each event
updates the rows it touches, one event at a time, in position order, starting from the rows as
they were after the previous batch. That is why splitting the log into batches cannot change
the result, not even in the last bit of a float sum: the additions happen in the same order
whatever the split.

Invariants:
- Money is ``Decimal``. Cost is recomputed from token counts with the given
  :class:`~pipeline.PriceTable`, so replaying with a new table re-prices history. A model
  without a price is *unpriced*: cost ``None`` and ``priced=False``, never ``Decimal(0)``.
  Stored costs are quantized to 10 decimal places (``Numeric(20, 10)``); every increment is
  quantized before it is added, so sums stay on that grid and storage never rounds them.
- Tokens and cost count what the provider billed: the sum over a call's ``received`` events.
- A call is ``interrupted`` until its ``completed`` event arrives; then it takes that outcome.
- ``usage_daily`` files a call under the UTC day its ``trace_created`` occurred and the model
  and operation named there. ``calls`` counts started calls, so
  ``calls - succeeded - failed - cancelled`` is the number still open or interrupted.
- ``metrics_minute`` files each event under the UTC minute of its ``occurred_at``; a wait is
  filed under the minute it ended.
- A request counts (``metrics_minute.requests_sent``, ``calls.attempts``) only if it left: an
  ``attempt_failed`` with ``not_sent`` (write-ahead refused, or cancelled, before the request
  left) takes its ``sent`` back, in the same minute (it carries the ``sent``'s time).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, NamedTuple

from llmtrail.pipeline import Event, PriceTable

__all__ = [
    "COST_QUANTUM",
    "CallRow",
    "MetricsRow",
    "FoldEvent",
    "UsageKey",
    "UsageRow",
    "apply_calls",
    "apply_metrics",
    "apply_usage",
    "call_usage_key",
    "event_minutes",
    "metrics_minutes",
    "minute_of",
    "paused_gc",
    "quantize_cost",
]

COST_QUANTUM = Decimal("1e-10")
_INTERRUPTED = "interrupted"
_FINAL_OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})


class FoldEvent(NamedTuple):
    """The fields of a stored event the folds read, with its store position."""

    position: int
    call_id: str
    type: str
    occurred_at: datetime
    trace_id: str | None
    instance: str | None
    payload: Mapping[str, Any]

    @classmethod
    def from_event(cls, position: int, event: Event) -> FoldEvent:
        return cls(
            position,
            event.call_id,
            str(event.type),
            event.occurred_at,
            event.trace_id,
            event.instance,
            event.payload,
        )


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector around bulk work that builds no reference cycles;
    it resumes, as it was, on exit.

    A fold of one batch allocates tens of thousands of short-lived dicts and tuples: with the
    collector on, each batch pays for several full scans of them (a quarter of a rebuild's
    CPU); there the pause never spans an ``await``. A workload extraction's 100,000-row
    queries and a replay's tasks and futures outlive the young generations, and each full
    collection they trigger scans the whole heap (SQLAlchemy, OpenAI's SDK and numpy loaded):
    measured, that tripled an extraction's time. What they build is freed by reference
    counting."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def utc(value: datetime) -> datetime:
    """Aware UTC; a naive value (SQLite drops the offset) is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def minute_of(value: datetime) -> datetime:
    return utc(value).replace(second=0, microsecond=0)


def quantize_cost(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(COST_QUANTUM)


def _int(payload: Mapping[str, Any], name: str) -> int:
    value = payload.get(name)
    return int(value) if value is not None else 0


def _float(payload: Mapping[str, Any], name: str) -> float:
    value = payload.get(name)
    return float(value) if value is not None else 0.0


def _opt_float(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    return float(value) if value is not None else None


def _opt_str(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return str(value) if value is not None else None


def _event_cost(
    prices: PriceTable, model: str | None, payload: Mapping[str, Any]
) -> Decimal | None:
    if model is None:
        return None
    return quantize_cost(
        prices.cost(
            model,
            input_tokens=_int(payload, "input_tokens"),
            cached_tokens=_int(payload, "cached_tokens"),
            output_tokens=_int(payload, "output_tokens"),
        )
    )


# --------------------------------------------------------------------------------------------
# calls


@dataclass(slots=True)
class CallRow:
    """One row of ``calls``; the field names are the column names."""

    call_id: str
    trace_id: str | None = None
    operation_name: str | None = None
    model: str | None = None
    outcome: str = _INTERRUPTED
    error_type: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal | None = None
    priced: bool = False
    rpm_wait_s: float = 0.0
    tpm_wait_s: float = 0.0
    semaphore_wait_s: float = 0.0
    latency_s: float | None = None
    total_s: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    instance: str | None = None
    rate_limited: int = 0
    last_position: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(CALL_COLUMNS, _call_values(self), strict=True))

    def as_tuple(self) -> tuple[Any, ...]:
        """The values in :data:`CALL_COLUMNS` order (the ``calls`` table's column order)."""
        return _call_values(self)

    def reprice(self, prices: PriceTable) -> None:
        """Cost is a function of (model, tokens): recomputed whenever either changes."""
        cost = (
            None
            if self.model is None
            else prices.cost(
                self.model,
                input_tokens=self.input_tokens,
                cached_tokens=self.cached_tokens,
                output_tokens=self.output_tokens,
            )
        )
        self.priced = cost is not None
        self.cost_usd = quantize_cost(cost)


CALL_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CallRow))
_call_values = attrgetter(*CALL_COLUMNS)


def apply_calls(
    rows: dict[str, CallRow], events: Sequence[FoldEvent], prices: PriceTable
) -> set[str]:
    """Fold ``events`` into ``rows`` (call_id -> row, the rows as stored so far, mutated in
    place); returns the call_ids touched. ``trace_id`` and ``instance`` come from the first
    event of the call."""
    for event in events:
        row = rows.get(event.call_id)
        if row is None:
            row = rows[event.call_id] = CallRow(
                event.call_id, trace_id=event.trace_id, instance=event.instance or None
            )
        kind = event.type
        payload = event.payload
        # Branches in the order of how often each type occurs.
        if kind == "gate_wait":
            gate = payload.get("gate")
            if gate == "rpm":
                row.rpm_wait_s += _float(payload, "waited_s")
            elif gate == "tpm":
                row.tpm_wait_s += _float(payload, "waited_s")
        elif kind == "sent":
            row.attempts += 1
        elif kind == "semaphore_acquired":
            row.semaphore_wait_s += _float(payload, "waited_s")
        elif kind == "received":
            row.input_tokens += _int(payload, "input_tokens")
            row.cached_tokens += _int(payload, "cached_tokens")
            row.output_tokens += _int(payload, "output_tokens")
            row.reasoning_tokens += _int(payload, "reasoning_tokens")
            latency = payload.get("latency_s")
            if latency is not None:
                row.latency_s = float(latency)
            row.reprice(prices)
        elif kind == "trace_created":
            row.operation_name = _opt_str(payload, "operation_name")
            row.model = _opt_str(payload, "model")
            row.started_at = utc(event.occurred_at)
            row.metadata = dict(payload.get("metadata") or {})
            row.reprice(prices)
        elif kind == "completed":
            outcome = payload.get("outcome")
            row.outcome = outcome if outcome in _FINAL_OUTCOMES else _INTERRUPTED
            row.error_type = _opt_str(payload, "error_type")
            row.finished_at = utc(event.occurred_at)
            row.total_s = _opt_float(payload, "total_s")
            # A call that never reached `sent` (validation, cancelled in a gate) reports its
            # attempts itself; otherwise both agree.
            row.attempts = max(row.attempts, _int(payload, "attempts"))
            if row.model is None and payload.get("model") is not None:
                row.model = str(payload["model"])
                row.reprice(prices)
        elif kind == "attempt_failed":
            latency = payload.get("latency_s")
            if latency is not None:
                row.latency_s = float(latency)
            if payload.get("error_type") == "rate_limited":
                row.rate_limited += 1
            if payload.get("not_sent"):  # its `sent` never left: not an attempt
                row.attempts -= 1
        row.last_position = event.position
    return {event.call_id for event in events}


# --------------------------------------------------------------------------------------------
# usage_daily


class UsageKey(NamedTuple):
    day: date
    model: str
    operation_name: str


@dataclass(slots=True)
class UsageRow:
    """One row of ``usage_daily`` (without its key). ``cost_usd`` is ``None`` while every
    call counted here is unpriced."""

    calls: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    unpriced_calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, other: UsageRow) -> None:
        """Every field is an integer or a Decimal, so adding is exact and associative."""
        self.calls += other.calls
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.cancelled += other.cancelled
        self.unpriced_calls += other.unpriced_calls
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        if other.cost_usd is not None:
            self.cost_usd = other.cost_usd + (self.cost_usd or Decimal(0))


USAGE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))


def call_usage_key(event: FoldEvent) -> UsageKey:
    """The ``usage_daily`` key of a call, from its ``trace_created`` event."""
    payload = event.payload
    return UsageKey(
        utc(event.occurred_at).date(),
        str(payload.get("model") or ""),
        str(payload.get("operation_name") or ""),
    )


def apply_usage(
    deltas: dict[UsageKey, UsageRow],
    call_keys: dict[str, UsageKey],
    events: Iterable[FoldEvent],
    prices: PriceTable,
) -> None:
    """Fold ``events`` into ``deltas`` (the batch's effect per key, added to the stored rows
    afterwards). ``call_keys`` maps the calls started before this batch to their key; the
    calls started in it are added as their ``trace_created`` goes by. An event of a call with
    no earlier ``trace_created`` has no key and is skipped."""
    for event in events:
        kind = event.type
        if kind == "trace_created":
            key = call_usage_key(event)
            call_keys[event.call_id] = key
            row = deltas.get(key)
            if row is None:
                row = deltas[key] = UsageRow()
            row.calls += 1
            if not key.model or prices.price(key.model) is None:
                row.unpriced_calls += 1
            continue
        if kind != "received" and kind != "completed":
            continue
        found = call_keys.get(event.call_id)
        if found is None:
            continue
        row = deltas.get(found)
        if row is None:
            row = deltas[found] = UsageRow()
        payload = event.payload
        if kind == "received":
            row.input_tokens += _int(payload, "input_tokens")
            row.cached_tokens += _int(payload, "cached_tokens")
            row.output_tokens += _int(payload, "output_tokens")
            row.reasoning_tokens += _int(payload, "reasoning_tokens")
            cost = _event_cost(prices, found.model or None, payload)
            if cost is not None:
                row.cost_usd = cost + (row.cost_usd or Decimal(0))
        else:
            outcome = payload.get("outcome")
            if outcome == "succeeded":
                row.succeeded += 1
            elif outcome == "failed":
                row.failed += 1
            elif outcome == "cancelled":
                row.cancelled += 1


# --------------------------------------------------------------------------------------------
# metrics_minute


@dataclass(slots=True)
class MetricsRow:
    """One row of ``metrics_minute`` (without its key)."""

    requests_sent: int = 0
    responses_received: int = 0
    tokens: int = 0
    rate_limited: int = 0
    errors: int = 0
    rpm_wait_s: float = 0.0
    tpm_wait_s: float = 0.0
    semaphore_wait_s: float = 0.0
    latency_sum_s: float = 0.0
    latency_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


METRICS_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(MetricsRow))
_METRIC_TYPES = frozenset({"gate_wait", "semaphore_acquired", "sent", "received", "attempt_failed"})
_MINUTE = timedelta(minutes=1)


def event_minutes(events: Sequence[FoldEvent]) -> list[datetime | None]:
    """The ``metrics_minute`` key of each event (``None`` for a type it does not count).

    Events come in time order, so most fall in the minute of the one before: checking that
    range first saves building a datetime per event on a full rebuild."""
    out: list[datetime | None] = []
    append = out.append
    low = high = key = None
    for event in events:
        if event.type not in _METRIC_TYPES:
            append(None)
            continue
        at = event.occurred_at
        if low is None or high is None or not (low <= at < high):
            key = minute_of(at)
            low, high = key, key + _MINUTE
            if at.tzinfo is None:  # compare like with like
                low, high = low.replace(tzinfo=None), high.replace(tzinfo=None)
        append(key)
    return out


def metrics_minutes(events: Sequence[FoldEvent]) -> set[datetime]:
    """The minutes a batch touches, so that their stored rows can be loaded first."""
    return {m for m in event_minutes(events) if m is not None}


def apply_metrics(
    rows: dict[datetime, MetricsRow],
    events: Sequence[FoldEvent],
    minutes: Sequence[datetime | None] | None = None,
) -> set[datetime]:
    """Fold ``events`` into ``rows`` (minute -> row, the stored rows of every minute the batch
    touches, mutated in place); returns the minutes touched. ``minutes`` is
    :func:`event_minutes` of the batch, if already computed. Float sums are a left fold onto
    the stored value, never a batch subtotal added later, so they do not depend on the split."""
    if minutes is None:
        minutes = event_minutes(events)
    touched: set[datetime] = set()
    current: datetime | None = None
    row = MetricsRow()
    for event, minute in zip(events, minutes, strict=True):
        if minute is None:
            continue
        if minute != current:
            found = rows.get(minute)
            if found is None:
                found = rows[minute] = MetricsRow()
            row, current = found, minute
            touched.add(minute)
        kind = event.type
        payload = event.payload
        if kind == "sent":
            row.requests_sent += 1
        elif kind == "received":
            row.responses_received += 1
            total = payload.get("total_tokens")
            row.tokens += (
                int(total)
                if total is not None
                else _int(payload, "input_tokens") + _int(payload, "output_tokens")
            )
            latency = payload.get("latency_s")
            if latency is not None:
                row.latency_sum_s += float(latency)
                row.latency_count += 1
        elif kind == "attempt_failed":
            row.errors += 1
            if payload.get("error_type") == "rate_limited":
                row.rate_limited += 1
            if payload.get("not_sent"):  # its `sent`, same instant, never left
                row.requests_sent -= 1
        elif kind == "gate_wait":
            gate = payload.get("gate")
            if gate == "rpm":
                row.rpm_wait_s += _float(payload, "waited_s")
            elif gate == "tpm":
                row.tpm_wait_s += _float(payload, "waited_s")
        else:  # semaphore_acquired
            row.semaphore_wait_s += _float(payload, "waited_s")
    return touched

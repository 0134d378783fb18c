"""The figures of a run, recorded or simulated, computed by one function for both.

Invariants:
- :class:`Run` holds per-call results index-aligned; NaN ``first_sent`` means never sent.
- ``queue length`` counts calls waiting at a gate or for the semaphore: from arrival to the send
  of attempt 1, plus the RPM waits of retries. :func:`figures` computes every figure the same way
  for the recording (:func:`recorded_run`) and a replay, so they compare like for like.
- Money is exact: the answered calls' real tokens, priced by :class:`~pipeline.PriceTable` as
  the service prices them (the answering model first); an unpriced model is counted, never $0.
- A failed call is a failure whatever its error, a call that only ever got 429s included; the
  failure rate is failed / calls, and failures are also counted by error type.
- Sustainable throughput is successful calls per second while the pipeline is saturated (some
  call waiting at a gate or for a permit): what these limits can deliver, not what the traffic
  asked for. When calls waited less than 5% of the makespan the limits were never reached: it
  is then None (``saturated=False``) and ``throughput_cps`` is a lower bound of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from llmtrail.pipeline import ErrorType, PriceTable

from ._workload import RecordedCall, Workload

__all__ = ["Figures", "Run", "figures", "queue_timeline", "recorded_figures", "recorded_run"]

_RATE_LIMITED = str(ErrorType.RATE_LIMITED)


@dataclass(slots=True)
class Run:
    """Per-call results of one replay (or of the recording), index-aligned."""

    arrival: list[float]
    first_sent: list[float]  # NaN: never sent
    finished: list[float]
    rpm_wait: list[float]
    tpm_wait: list[float]
    sem_wait: list[float]
    outcome: list[str]
    error_type: list[str | None]
    retry_gate_waits: list[tuple[float, float]] = field(default_factory=list)
    requests: int = 0
    rate_limited: int = 0
    synthesized: int = 0
    answered: list[RecordedCall] = field(default_factory=list)  # calls that succeeded

    def __repr__(self) -> str:  # short: see Workload.__repr__
        return f"Run(calls={len(self.arrival)}, requests={self.requests})"


@dataclass(frozen=True, slots=True)
class Figures:
    calls: int
    succeeded: int
    failed: int
    requests: int
    rate_limited: int
    makespan_s: float
    drain_s: float
    throughput_cps: float
    requests_per_min: float
    queue_delay_s: dict[str, float]  # p50, p95, p99, mean
    total_latency_s: dict[str, float]
    gate_wait_s: dict[str, dict[str, float]]  # rpm / tpm / semaphore -> mean, p95
    peak_queue: int
    cost_usd: Decimal
    unpriced_calls: int
    synthesized: int = 0
    failures_by_type: dict[str, int] = field(default_factory=dict)
    sustainable_cps: float | None = None  # successful calls/s at saturation (module docs)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.calls if self.calls else 0.0

    @property
    def rate_limited_share(self) -> float:
        """429 answers per HTTP request."""
        return self.rate_limited / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_usd"] = str(self.cost_usd)
        data["failure_rate"] = self.failure_rate
        data["rate_limited_share"] = self.rate_limited_share
        return data


def _pcts(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan}
    p50, p95, p99 = np.percentile(values, (50, 95, 99))
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean())}


def _mean_p95(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"mean": math.nan, "p95": math.nan}
    return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95))}


def queue_timeline(run: Run) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(times, queue length from each time on): a step function, for the peak and the plot."""
    arrival = np.asarray(run.arrival, dtype=float)
    sent = np.asarray(run.first_sent, dtype=float)
    finished = np.asarray(run.finished, dtype=float)
    left = np.where(np.isnan(sent), finished, sent)
    starts = [arrival]
    ends = [left]
    if run.retry_gate_waits:
        extra = np.asarray(run.retry_gate_waits, dtype=float)
        starts.append(extra[:, 0])
        ends.append(extra[:, 1])
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    # A call sent on arrival never queued. Recorded send times are derived (answer time minus
    # latency, wall clock against monotonic), so waits under 0.1 ms are taken as none.
    waited = end - start > 1e-4
    start, end = start[waited], end[waited]
    times = np.concatenate([start, end])
    delta = np.concatenate([np.ones_like(start), -np.ones_like(end)])
    if times.size == 0:
        return times, delta
    order = np.argsort(times, kind="stable")
    times, delta = times[order], delta[order]
    # One step per instant, after everything that happened at it: no transient dips or peaks
    # from the order of simultaneous events.
    instants, first = np.unique(times, return_index=True)
    return instants, np.cumsum(np.add.reduceat(delta, first))


def _cost(calls: Iterable[RecordedCall], prices: PriceTable) -> tuple[Decimal, int]:
    """Exact cost of the answered calls' real tokens, priced as the service prices them."""
    sums: dict[tuple[str, str | None], list[int]] = {}
    for c in calls:
        key = (c.model, c.response_model)
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0]
        acc[0] += c.input_tokens
        acc[1] += min(c.cached_tokens, c.input_tokens)
        acc[2] += c.output_tokens
        acc[3] += 1
    total = Decimal(0)
    unpriced = 0
    for (model, response_model), (inp, cached, out, count) in sums.items():
        priced_as = response_model if response_model and prices.price(response_model) else model
        cost = prices.cost(priced_as, input_tokens=inp, cached_tokens=cached, output_tokens=out)
        if cost is None:
            unpriced += count
        else:
            total += cost
    return total, unpriced


def _sustainable(
    times: Any, queue: Any, finished: Any, succeeded: Any, makespan: float
) -> float | None:
    """Successful completions per second over the time some call was waiting (module docs)."""
    if times.size < 2 or makespan <= 0:
        return None
    busy = np.concatenate([[False], queue[:-1] > 0, [False]])
    # The busy periods, merged: from where waiting starts to where it stops.
    change = np.flatnonzero(np.diff(busy.astype(np.int8)))
    starts, ends = times[change[0::2]], times[change[1::2]]
    busy_s = float((ends - starts).sum())
    if busy_s < 0.05 * makespan:
        return None
    done = np.sort(finished[succeeded])
    inside = np.searchsorted(done, ends, side="left") - np.searchsorted(done, starts, side="left")
    return float(inside.sum()) / busy_s


def figures(run: Run, prices: PriceTable | None = None) -> Figures:
    arrival = np.asarray(run.arrival, dtype=float)
    sent = np.asarray(run.first_sent, dtype=float)
    finished = np.asarray(run.finished, dtype=float)
    n = arrival.size
    makespan = float(finished.max() - arrival.min()) if n else 0.0
    drain = float(finished.max() - arrival.max()) if n else 0.0
    was_sent = ~np.isnan(sent)
    outcomes = Counter(run.outcome)
    times, queue = queue_timeline(run)
    ok = np.asarray([o == "succeeded" for o in run.outcome], dtype=bool)
    failures = Counter(
        e or o for o, e in zip(run.outcome, run.error_type, strict=True) if o != "succeeded"
    )
    cost, unpriced = _cost(run.answered, prices or PriceTable.default())
    per_s = 1.0 / makespan if makespan > 0 else math.nan
    return Figures(
        calls=n,
        succeeded=outcomes.get("succeeded", 0),
        failed=n - outcomes.get("succeeded", 0),
        requests=run.requests,
        rate_limited=run.rate_limited,
        makespan_s=makespan,
        drain_s=drain,
        throughput_cps=n * per_s,
        requests_per_min=run.requests * per_s * 60.0,
        queue_delay_s=_pcts(sent[was_sent] - arrival[was_sent]),
        total_latency_s=_pcts(finished - arrival),
        gate_wait_s={
            "rpm": _mean_p95(np.asarray(run.rpm_wait, dtype=float)),
            "tpm": _mean_p95(np.asarray(run.tpm_wait, dtype=float)),
            "semaphore": _mean_p95(np.asarray(run.sem_wait, dtype=float)),
        },
        peak_queue=int(queue.max()) if queue.size else 0,
        cost_usd=cost,
        unpriced_calls=unpriced,
        synthesized=run.synthesized,
        failures_by_type=dict(failures.most_common()),
        sustainable_cps=_sustainable(times, queue, finished, ok, makespan),
    )


def recorded_run(workload: Workload) -> Run:
    """The recording, in the simulation's terms."""
    calls = workload.calls
    nan = math.nan
    run = Run(
        arrival=[c.arrival_s for c in calls],
        first_sent=[nan if c.first_sent_s is None else c.first_sent_s for c in calls],
        # total_s is monotonic time from the call's start: immune to wall-clock steps.
        finished=[c.arrival_s + c.total_s for c in calls],
        rpm_wait=[c.rpm_wait_s for c in calls],
        tpm_wait=[c.tpm_wait_s for c in calls],
        sem_wait=[c.semaphore_wait_s for c in calls],
        outcome=[c.outcome for c in calls],
        error_type=[c.error_type for c in calls],
        retry_gate_waits=[w for c in calls for w in c.retry_gate_waits],
        requests=sum(len(c.attempts) for c in calls),
        rate_limited=sum(1 for c in calls for a in c.attempts if a.error_type == _RATE_LIMITED),
        answered=[c for c in calls if c.outcome == "succeeded"],
    )
    return run


def recorded_figures(workload: Workload, prices: PriceTable | None = None) -> Figures:
    return figures(recorded_run(workload), prices)

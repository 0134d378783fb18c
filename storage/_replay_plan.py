"""Capacity planning over replays: sweeps of knobs and tiers, and the one recommendation.

A *tier* is what a planner can buy: a provider limit (RPM, TPM) at a price per month. Each
tier is replayed with the provider model enforcing its limits and, unless the gates are set or
swept explicitly, the client gates set to the same limits (the service configured for it).

Invariants:
- A recommendation is only ever a setting under which the failure rate is at most
  ``max_failure_rate`` (default 0: every call succeeds) and, when a target is given, the
  total-latency p95 is at most the target. A combination that stalled is never recommended.
- Cheapest = the lowest tier price (per hour: price per month / 730) when tiers are given;
  then the lowest knob values, compared in the order the knobs were swept (the first the most
  significant; ``none`` counts as infinite).
- The evidence names the next cheaper combination and why it was not chosen, so the choice
  can be checked against a real run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from llmtrail.pipeline import ConfigurationError, PriceTable

from ._replay import Replay, ReplayStalledError, replay
from ._replay_model import KNOBS, ReplaySettings, provider_defaults
from ._workload import Workload

__all__ = ["Recommendation", "SweepRow", "Tier", "parse_tier", "read_tiers", "recommend", "sweep"]

HOURS_PER_MONTH = Decimal(730)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    rpm: int
    tpm: int
    usd_per_month: Decimal

    @property
    def usd_per_hour(self) -> Decimal:
        return self.usd_per_month / HOURS_PER_MONTH


def parse_tier(spec: str) -> Tier:
    """``NAME=rpm,tpm,usd_per_month`` (e.g. ``tier2=5000,2000000,500``)."""
    name, sep, values = spec.partition("=")
    parts = [p.strip() for p in values.split(",")]
    fix = "give NAME=rpm,tpm,usd_per_month, e.g. --tier tier2=5000,2000000,500"
    if not sep or not name.strip() or len(parts) != 3:
        raise ConfigurationError(f"--tier {spec!r} is not NAME=rpm,tpm,usd_per_month: {fix}")
    try:
        rpm, tpm = int(parts[0]), int(parts[1])
        usd = Decimal(parts[2])
    except (ValueError, InvalidOperation):
        raise ConfigurationError(
            f"--tier {spec!r} has a value that is not a number: {fix}"
        ) from None
    if rpm < 1 or tpm < 1 or not usd.is_finite() or usd < 0:
        raise ConfigurationError(f"--tier {spec!r}: rpm and tpm must be >= 1, the price >= 0")
    return Tier(name.strip(), rpm, tpm, usd)


def read_tiers(path: str) -> list[Tier]:
    """Tiers from a file: one ``NAME=rpm,tpm,usd_per_month`` per line; ``#`` starts a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"--tier-file {path!r} cannot be read: {exc.strerror}") from None
    tiers = [parse_tier(line) for raw in text.splitlines() if (line := raw.split("#")[0].strip())]
    if not tiers:
        raise ConfigurationError(f"--tier-file {path!r} holds no tier: one NAME=rpm,tpm,usd a line")
    return tiers


@dataclass(slots=True)
class SweepRow:
    knobs: dict[str, Any]
    replay: Replay | None  # None: the combination stalled
    stalled: str | None = None  # why, when it stalled
    tier: Tier | None = None
    notes: list[str] = field(default_factory=list)

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.knobs.items()) or "the recorded settings"

    def to_dict(self) -> dict[str, Any]:
        figures = self.replay.figures.to_dict() if self.replay is not None else {}
        tier = None
        if self.tier is not None:
            tier = {
                "name": self.tier.name,
                "rpm": self.tier.rpm,
                "tpm": self.tier.tpm,
                "usd_per_month": str(self.tier.usd_per_month),
                "usd_per_hour": str(round(self.tier.usd_per_hour, 4)),
            }
        return {"knobs": self.knobs, "tier": tier, "stalled": self.stalled, "notes": self.notes} | (
            figures
        )


def sweep(
    workload: Workload,
    base: ReplaySettings,
    grid: Sequence[tuple[str, Sequence[Any]]],
    *,
    tiers: Sequence[Tier] = (),
    gates_follow_tier: bool = True,
    provider_window_given: bool = False,
    prices: PriceTable | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[SweepRow]:
    """One replay per tier (if any) x combination of ``grid`` (knob name, values), in that
    order (the last knob varies fastest). Without tiers, each combination gets the provider
    model when its gates are looser than the provider's stated limit (``provider_defaults``).
    ``on_progress(description, done, total)`` reports each replay's calls and, as
    ``"sweep"``, the combinations done."""
    names = []
    for name, values in grid:
        if name not in KNOBS:
            raise ConfigurationError(f"cannot sweep {name!r}: use one of {sorted(KNOBS)}")
        if not values:
            raise ConfigurationError(f"--sweep {name}= has no values: give e.g. {name}=10,20")
        names.append(KNOBS[name])
    combos: list[tuple[Any, ...]] = [()]
    for _, values in grid:
        combos = [combo + (value,) for combo in combos for value in values]
    plans: list[tuple[Tier | None, tuple[Any, ...]]] = [
        (tier, combo) for tier in ([*tiers] if tiers else [None]) for combo in combos
    ]
    rows = []
    for i, (tier, combo) in enumerate(plans):
        knobs = dict(zip([name for name, _ in grid], combo, strict=True))
        settings = base
        notes: list[str] = []
        if tier is not None:
            knobs = {"tier": tier.name} | knobs
            settings = settings.with_(provider_rpm=tier.rpm, provider_tpm=tier.tpm)
            if gates_follow_tier:
                settings = settings.with_(max_rpm=tier.rpm, max_tpm=tier.tpm)
        settings = settings.with_(**dict(zip(names, combo, strict=True)))
        if tier is None:
            settings, notes = provider_defaults(
                workload, settings, window_given=provider_window_given
            )
        label = "replaying " + " ".join(f"{k}={v}" for k, v in knobs.items())
        step = None if on_progress is None else functools.partial(on_progress, label)
        try:
            result = replay(workload, settings, prices=prices, on_progress=step)
        except ReplayStalledError as exc:
            rows.append(SweepRow(knobs, None, str(exc), tier, notes))
        else:
            rows.append(SweepRow(knobs, result, None, tier, notes))
        if on_progress is not None:
            on_progress("sweep", i + 1, len(plans))
    return rows


def _cost_key(row: SweepRow) -> tuple[Any, ...]:
    """Cheapest first: the tier's price, then the knob values in sweep order."""
    price = row.tier.usd_per_month if row.tier is not None else Decimal(0)
    values = [v for k, v in row.knobs.items() if k != "tier"]
    return (price, *(math.inf if v is None else float(v) for v in values))


@dataclass(slots=True)
class Recommendation:
    row: SweepRow | None  # None: nothing qualifies
    line: str  # the one line a planner reads
    evidence: list[str]  # why, and why not the next cheaper
    next_cheaper: SweepRow | None = None


def _misses(row: SweepRow, max_failure_rate: float, target_p95_s: float | None) -> list[str]:
    """Why ``row`` does not qualify (empty: it does)."""
    if row.replay is None:
        return ["it stalls"]
    f = row.replay.figures
    reasons = []
    if f.failure_rate > max_failure_rate:
        kinds = ", ".join(f"{n} {kind}" for kind, n in f.failures_by_type.items())
        reasons.append(
            f"{f.failed:,} of {f.calls:,} calls fail ({f.failure_rate:.1%} > "
            f"{max_failure_rate:.1%}: {kinds})"
        )
    p95 = f.total_latency_s["p95"]
    if target_p95_s is not None and not p95 <= target_p95_s:
        reasons.append(f"p95 {p95:.3f} s > target {target_p95_s:g} s")
    return reasons


def _evidence(row: SweepRow) -> str:
    assert row.replay is not None
    f = row.replay.figures
    t = f.total_latency_s
    sustainable = (
        f"sustains {f.sustainable_cps:.2f} successful calls/s"
        if f.sustainable_cps is not None
        else f"never saturated (>= {f.throughput_cps:.2f} calls/s)"
    )
    price = f", ${row.tier.usd_per_hour:.4f}/h for the tier" if row.tier is not None else ""
    return (
        f"p50/p95/p99 {t['p50']:.3f}/{t['p95']:.3f}/{t['p99']:.3f} s, "
        f"{f.failed:,} of {f.calls:,} failed, {f.rate_limited:,} 429s "
        f"({f.rate_limited_share:.1%} of requests), makespan {f.makespan_s:.2f} s, {sustainable}, "
        f"tokens ${f.cost_usd:.4f}{price}"
    )


def recommend(
    rows: Sequence[SweepRow],
    *,
    max_failure_rate: float = 0.0,
    target_p95_s: float | None = None,
) -> Recommendation:
    """The cheapest row that qualifies (module docs), with its evidence."""
    ordered = sorted(rows, key=_cost_key)
    goal = f"failure rate <= {max_failure_rate:.1%}" + (
        f" and p95 <= {target_p95_s:g} s" if target_p95_s is not None else ""
    )
    by = "tier price, then " if any(r.tier is not None for r in rows) else ""
    for i, row in enumerate(ordered):
        if _misses(row, max_failure_rate, target_p95_s):
            continue
        evidence = [f"{row.label()}: {_evidence(row)}"]
        cheaper = ordered[i - 1] if i > 0 else None
        if cheaper is not None:
            why = "; ".join(_misses(cheaper, max_failure_rate, target_p95_s))
            evidence.append(f"next cheaper, {cheaper.label()}, does not qualify: {why}")
        elif len(ordered) > 1:
            evidence.append("it is the cheapest combination replayed")
        line = (
            f"RECOMMENDED: {row.label()} (the cheapest by {by}knob values with {goal})"
            if len(ordered) > 1
            else f"RECOMMENDED: {row.label()} (it has {goal})"
        )
        return Recommendation(row, line, evidence, cheaper)
    evidence = [
        f"{row.label()}: {'; '.join(_misses(row, max_failure_rate, target_p95_s))}"
        for row in ordered
    ]
    if len(ordered) == 1:
        line = f"NOT RECOMMENDED: {ordered[0].label()} does not have {goal}"
    else:
        line = f"NO RECOMMENDATION: no combination has {goal}"
    return Recommendation(None, line, evidence)

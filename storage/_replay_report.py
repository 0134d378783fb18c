"""The report of ``llmtrail replay``: tables on the terminal, or one JSON document.

Invariants:
- The recommendation line comes first after the tables, alone on its line, with its evidence
  under it; notes (provider model turned on, no provider limit known, calibration) follow.
- ``--json`` prints exactly one JSON document (NaN becomes null) with the same content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._replay import Replay
from ._replay_figures import Figures
from ._replay_model import ReplaySettings
from ._replay_plan import Recommendation, SweepRow
from ._workload import Workload

__all__ = ["Report", "knobs_line", "print_report"]


@dataclass(slots=True)
class Report:
    workload: Workload
    recorded: Figures
    settings: ReplaySettings
    rows: list[SweepRow] = field(default_factory=list)
    single: Replay | None = None
    notes: list[str] = field(default_factory=list)
    recommendation: Recommendation | None = None

    def single_row(self) -> SweepRow:
        """The single replay as a row (its knobs: the ones that differ from the recording)."""
        assert self.single is not None
        base = ReplaySettings.recorded(self.workload).to_dict()
        mine = self.settings.to_dict()
        changed = {k: v for k, v in mine.items() if base.get(k) != v}
        if not self.settings.provider_model:  # the provider's window etc. were not used
            changed = {k: v for k, v in changed.items() if not k.startswith("provider_")}
        return SweepRow(changed, self.single)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _workload_info(workload: Workload) -> dict[str, Any]:
    stated = workload.provider_limits
    return {
        "calls": len(workload.calls),
        "start": workload.start.isoformat(),
        "span_s": workload.span_s,
        "recorded_settings": {
            k: getattr(workload.settings, k) for k in workload.settings.__dataclass_fields__
        },
        "provider_stated_limits": None
        if stated is None
        else {"rpm": stated.rpm, "tpm": stated.tpm, "window_s": stated.window_s},
        "settings_variants": workload.settings_variants,
        "incomplete_calls_skipped": workload.incomplete,
    }


def print_report(report: Report, *, as_json: bool, order: Sequence[str]) -> None:
    rec = report.recommendation
    assert rec is not None
    if as_json:
        doc: dict[str, Any] = {
            "workload": _workload_info(report.workload),
            "recorded": report.recorded.to_dict(),
            "notes": report.notes,
            "recommendation": {
                "line": rec.line,
                "knobs": None if rec.row is None else rec.row.knobs,
                "evidence": rec.evidence,
            },
        }
        if report.rows:
            doc["rows"] = [
                {"settings": r.replay.settings.to_dict() if r.replay else None, **r.to_dict()}
                for r in report.rows
            ]
            doc["cheapest_order"] = (["tier"] if report.rows[0].tier else []) + list(order)
        else:
            assert report.single is not None
            doc["settings"] = report.single.settings.to_dict()
            doc["simulated"] = report.single.figures.to_dict()
        print(json.dumps(_clean(doc), indent=2, default=str))
        return
    from rich.console import Console

    console = Console()
    if report.rows:
        _print_sweep(console, report)
    else:
        _print_single(console, report)
    # Whole lines (soft wrap): the recommendation is one line, whatever the terminal's width.
    style = "bold green" if rec.row is not None else "bold red"
    console.print(rec.line, style=style, markup=False, soft_wrap=True)
    for line in rec.evidence:
        console.print(f"  {line}", markup=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:,.1f}"


def _three(p: dict[str, float]) -> str:
    return " / ".join(_seconds(p[k]) for k in ("p50", "p95", "p99")) + " s"


def _failures(f: Figures) -> str:
    if not f.failed:
        return "0"
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in f.failures_by_type.items())
    return f"{f.failed:,} ({f.failure_rate:.1%}: {kinds})"


def _figure_rows(f: Figures) -> list[tuple[str, str]]:
    q, t, g = f.queue_delay_s, f.total_latency_s, f.gate_wait_s
    cost = f"${f.cost_usd:.4f}" + (f" (+{f.unpriced_calls} unpriced)" if f.unpriced_calls else "")
    sustainable = (
        f"{f.sustainable_cps:,.2f}"
        if f.sustainable_cps is not None
        else f"not reached (>= {f.throughput_cps:,.2f})"
    )
    return [
        ("calls (succeeded / failed)", f"{f.calls:,} ({f.succeeded:,} / {f.failed:,})"),
        ("failures by type", _failures(f)),
        ("HTTP requests", f"{f.requests:,}"),
        ("429 answers (share of requests)", f"{f.rate_limited:,} ({f.rate_limited_share:.1%})"),
        ("latency p50 / p95 / p99", _three(t)),
        ("queueing delay p50 / p95 / p99", _three(q)),
        *(
            (
                f"{gate} wait mean / p95",
                f"{_seconds(g[gate]['mean'])} / {_seconds(g[gate]['p95'])} s",
            )
            for gate in ("rpm", "tpm", "semaphore")
        ),
        ("makespan", f"{_seconds(f.makespan_s)} s"),
        ("throughput, calls/s", f"{f.throughput_cps:,.2f}"),
        ("sustainable, successful calls/s", sustainable),
        ("peak queue (gates + semaphore)", f"{f.peak_queue:,}"),
        ("cost at today's prices", cost),
    ]


def knobs_line(settings: ReplaySettings) -> str:
    s = settings
    parts = [
        f"max_rpm={s.max_rpm}",
        f"max_tpm={s.max_tpm}",
        f"window={s.window_s:g}s",
        f"max_concurrent={s.max_concurrent_requests}",
        f"max_attempts={s.max_attempts}",
        f"scale={s.scale:g} ({s.scale_method})",
    ]
    if s.provider_model:
        parts.append(
            f"provider {s.provider_rpm or '-'} RPM / {s.provider_tpm or '-'} TPM "
            f"per {s.provider_window_s:g}s"
        )
    if s.client_cpu_s is not None:
        parts.append(f"client CPU {s.client_cpu_s * 1000:.2f} ms")
    return ", ".join(parts)


def _print_single(console: Any, report: Report) -> None:
    from rich.table import Table

    shown, workload = report.single, report.workload
    assert shown is not None
    table = Table(
        title=f"llmtrail replay: {len(workload.calls):,} calls recorded from "
        f"{workload.start:%Y-%m-%d %H:%M:%S} UTC over {workload.span_s:,.1f} s",
        caption=f"simulated with {knobs_line(shown.settings)}",
    )
    table.add_column("figure", no_wrap=True)
    table.add_column("recorded", justify="right")
    table.add_column("simulated", justify="right")
    for (name, rec), (_, sim) in zip(
        _figure_rows(report.recorded), _figure_rows(shown.figures), strict=True
    ):
        table.add_row(name, rec, sim)
    console.print(table)
    if shown.figures.synthesized:
        console.print(
            f"{shown.figures.synthesized} calls never answered in the recording were answered "
            "in the replay (after a recorded answer time), without tokens or cost."
        )


def _print_sweep(console: Any, report: Report) -> None:
    from rich.table import Table

    rows, recorded = report.rows, report.recorded
    chosen = report.recommendation.row if report.recommendation else None
    table = Table(
        title=f"llmtrail replay sweep: {len(report.workload.calls):,} calls, "
        f"{len(rows)} combinations",
        caption=f"recorded: p95 {recorded.total_latency_s['p95']:.3f} s, "
        f"{recorded.failed:,} failed, makespan {recorded.makespan_s:.3f} s",
    )
    for name in rows[0].knobs:
        table.add_column(name, justify="right")
    columns = ("p50 s", "p95 s", "p99 s", "failed", "429s", "makespan s", "sustain/s", "$/h tier")
    for column in (*columns, "tokens $"):
        table.add_column(column, justify="right")
    for row in rows:
        knobs = [str(v) for v in row.knobs.values()]
        if row.replay is None:
            table.add_row(*knobs, "stalled", style="red")
            continue
        f = row.replay.figures
        t = f.total_latency_s
        style = "bold green" if row is chosen else ("dim" if f.failed else None)
        table.add_row(
            *knobs,
            f"{t['p50']:.3f}",
            f"{t['p95']:.3f}",
            f"{t['p99']:.3f}",
            f"{f.failed:,} ({f.failure_rate:.0%})" if f.failed else "0",
            f"{f.rate_limited:,} ({f.rate_limited_share:.0%})",
            f"{f.makespan_s:.2f}",
            "-" if f.sustainable_cps is None else f"{f.sustainable_cps:.2f}",
            "-" if row.tier is None else f"{row.tier.usd_per_hour:.4f}",
            f"{f.cost_usd:.4f}",
            style=style,
        )
    console.print(table)
    for row in rows:
        if row.stalled is not None:
            console.print(f"{row.label()} stalled: {row.stalled}", style="red", markup=False)
    seen: set[str] = set()
    for row in rows:
        for note in row.notes:
            if note not in seen:
                seen.add(note)
                report.notes.append(note)

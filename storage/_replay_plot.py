"""The charts of ``llmtrail replay --plot``: what a planner reads at a glance.

- :func:`plot_sweep`: p95 latency (top) and failure rate (bottom) against the first swept knob
  (or the tier, by price), one line per combination of the other knobs, with the target and
  the failure limit drawn as lines and the recommendation marked.
- :func:`plot_replay`: one run over time, recorded against simulated: calls waiting, each
  call's latency at the time it finished (dots, with the p95 of each time bin as a line) and
  successful and failed completions per second. A bin without calls is a gap in the lines,
  never a line drawn across idle time.

Invariants: matplotlib's Agg canvas is used directly (no pyplot, no global backend); the
figure is sized and lettered to be legible at its default size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._replay import Replay
from ._replay_figures import Run, queue_timeline, recorded_run
from ._replay_plan import SweepRow
from ._replay_report import knobs_line
from ._workload import Workload

__all__ = ["plot_replay", "plot_sweep"]


def _canvas(rows: int, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, 1, sharex=True)


def _value_label(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def plot_sweep(
    rows: Sequence[SweepRow],
    path: str,
    *,
    target_p95_s: float | None,
    max_failure_rate: float,
    chosen: SweepRow | None,
    provider_limit: float | None = None,
) -> None:
    """A PNG of a sweep (module docs). ``provider_limit``: the provider's own limit on the
    swept knob (RPM or TPM), drawn as a vertical line where it falls among the values."""
    names = list(rows[0].knobs)
    x_name, rest = names[0], names[1:]
    xs: list[Any] = []
    for row in rows:
        if row.knobs[x_name] not in xs:
            xs.append(row.knobs[x_name])
    if x_name != "tier":  # numeric knobs in increasing order, none (no limit) last
        xs.sort(key=lambda v: math.inf if v is None else float(v))
    labels = [_value_label(v) for v in xs]
    if x_name == "tier":
        prices = {r.knobs["tier"]: r.tier for r in rows if r.tier is not None}
        labels = [f"{v}\n${prices[v].usd_per_month:,.0f}/month" for v in xs]
    figure, (p95_ax, fail_ax) = _canvas(2, 7.5)
    series: dict[tuple[Any, ...], list[SweepRow]] = {}
    for row in rows:
        series.setdefault(tuple(row.knobs[n] for n in rest), []).append(row)
    for key, members in series.items():
        label = ", ".join(f"{n}={_value_label(v)}" for n, v in zip(rest, key, strict=True))
        position = {xs.index(r.knobs[x_name]): r for r in members}
        at = sorted(position)
        p95 = [
            position[i].replay.figures.total_latency_s["p95"]  # type: ignore[union-attr]
            if position[i].replay is not None
            else math.nan
            for i in at
        ]
        failed = [
            100 * position[i].replay.figures.failure_rate  # type: ignore[union-attr]
            if position[i].replay is not None
            else math.nan
            for i in at
        ]
        (line,) = p95_ax.plot(at, p95, marker="o", linewidth=2, label=label or "p95")
        fail_ax.plot(at, failed, marker="o", linewidth=2, color=line.get_color(), label=label)
        # A setting that fails too often is drawn hollow: its p95 counts fast failures.
        bad = [
            (i, y)
            for i, y, f in zip(at, p95, failed, strict=True)
            if f > 100 * max_failure_rate + 1e-9
        ]
        if bad:
            p95_ax.plot(
                [i for i, _ in bad],
                [y for _, y in bad],
                linestyle="none",
                marker="o",
                markersize=11,
                markerfacecolor="white",
                color=line.get_color(),
            )
    if target_p95_s is not None:
        p95_ax.axhline(target_p95_s, color="tab:red", linestyle="--", linewidth=1.5)
        p95_ax.annotate(
            f"target p95 {target_p95_s:g} s",
            (0, target_p95_s),
            xytext=(4, 4),
            textcoords="offset points",
            color="tab:red",
        )
    fail_ax.axhline(100 * max_failure_rate, color="tab:red", linestyle="--", linewidth=1.5)
    fail_ax.annotate(
        f"failure limit {max_failure_rate:.1%}",
        (0, 100 * max_failure_rate),
        xytext=(4, 4),
        textcoords="offset points",
        color="tab:red",
    )
    numeric = [float(v) for v in xs if isinstance(v, int | float)]
    if provider_limit is not None and numeric and x_name != "tier":
        import numpy as np

        # Where the limit falls between the (categorical) positions of the numeric values.
        where = float(np.interp(provider_limit, numeric, range(len(numeric))))
        for ax in (p95_ax, fail_ax):
            ax.axvline(where, color="tab:purple", linestyle=":", linewidth=2)
        fail_ax.annotate(
            f"provider limit {provider_limit:,.0f}",
            (where, 0.5),
            xycoords=("data", "axes fraction"),
            xytext=(-6, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="center",
            color="tab:purple",
        )
    if chosen is not None and chosen.replay is not None:
        i = xs.index(chosen.knobs[x_name])
        y = chosen.replay.figures.total_latency_s["p95"]
        p95_ax.plot([i], [y], marker="*", markersize=22, color="tab:green", linestyle="none")
        p95_ax.annotate(
            "recommended",
            (i, y),
            xytext=(10, -16),
            textcoords="offset points",
            color="tab:green",
            fontweight="bold",
        )
    p95_ax.set_ylabel("total latency p95, s")
    p95_ax.set_title(
        "p95 latency and failures by setting (hollow: fails more than the limit)", fontsize=11
    )
    fail_ax.set_ylabel("calls failed, %")
    fail_ax.set_xlabel(x_name)
    fail_ax.set_xticks(range(len(xs)), labels)
    for ax in (p95_ax, fail_ax):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if rest:
        p95_ax.legend(loc="best", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _binned(times: Any, values: Any, edges: Any, active: Any | None = None) -> tuple[Any, Any]:
    """(bin centres, per bin: the p95 of ``values``, or with ``active`` the count of ``times``
    per second). NaN where there is nothing to show, so that a line has a gap there: a p95 bin
    without calls, a rate bin in which no call was in the system (``active`` False)."""
    import numpy as np

    index = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
    out = np.full(len(edges) - 1, np.nan)
    width = float(edges[1] - edges[0])
    for b in range(len(edges) - 1):
        inside = values[index == b]
        if active is not None:
            out[b] = inside.size / width if active[b] else np.nan
        elif inside.size:
            out[b] = np.percentile(inside, 95)
    return (edges[:-1] + edges[1:]) / 2, out


def _active(run: Run, edges: Any) -> Any:
    """Per bin: was any call in the system (arrived, not finished) during it?"""
    import numpy as np

    start = np.asarray(run.arrival, dtype=float)
    end = np.asarray(run.finished, dtype=float)
    bins = zip(edges[:-1], edges[1:], strict=True)
    return np.asarray([bool(((start < hi) & (end >= lo)).any()) for lo, hi in bins])


def _peaks(times: Any, values: Any, *, bins: int) -> tuple[Any, Any]:
    """A step function cut to at most ``bins`` steps, each the highest value in its bin."""
    import numpy as np

    if times.size <= 2 * bins:
        return times, values
    edges = np.linspace(times[0], times[-1], bins + 1)
    carried = values[np.clip(np.searchsorted(times, edges[:-1], side="right") - 1, 0, None)]
    inside = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, bins - 1)
    peak = carried.copy()
    np.maximum.at(peak, inside, values)
    return edges[:-1], peak


def plot_replay(workload: Workload, result: Replay, path: str) -> None:
    """A PNG of one run over time, recorded against simulated (module docs)."""
    import numpy as np

    recorded = recorded_run(workload)
    runs: list[tuple[Run, str, str]] = [
        (recorded, "recorded", "tab:blue"),
        (result.run, "simulated", "tab:orange"),
    ]
    end = max(float(np.nanmax(np.asarray(r.finished, dtype=float))) for r, _, _ in runs)
    edges = np.linspace(0.0, max(end, 1e-3), 41)
    figure, (queue_ax, latency_ax, rate_ax) = _canvas(3, 9)
    for run, label, color in runs:
        times, length = _peaks(*queue_timeline(run), bins=1500)
        times = np.concatenate([[min(run.arrival)], times])
        length = np.concatenate([[0], length])
        queue_ax.step(times, length, where="post", label=label, color=color, linewidth=1.2)
        finished = np.asarray(run.finished, dtype=float)
        latency = finished - np.asarray(run.arrival, dtype=float)
        ok = np.asarray([o == "succeeded" for o in run.outcome], dtype=bool)
        latency_ax.scatter(finished, latency, s=9, alpha=0.35, color=color, linewidths=0)
        centres, p95 = _binned(finished, latency, edges)
        # Markers too: a bin between two empty ones is a point, which a bare line would hide.
        latency_ax.plot(
            centres, p95, color=color, linewidth=2, marker="o", markersize=4, label=f"{label} p95"
        )
        active = _active(run, edges)
        centres, done = _binned(finished[ok], finished[ok], edges, active)
        rate_ax.plot(
            centres,
            done,
            color=color,
            linewidth=2,
            marker="o",
            markersize=3,
            label=f"{label} succeeded",
        )
        if (~ok).any():
            centres, failed = _binned(finished[~ok], finished[~ok], edges, active)
            rate_ax.plot(
                centres, failed, color=color, linestyle=":", linewidth=2, label=f"{label} failed"
            )
    queue_ax.set_ylabel("calls waiting")
    queue_ax.set_title(f"simulated with {knobs_line(result.settings)}", fontsize=9)
    latency_ax.set_ylabel("latency, s (dot: a call)")
    rate_ax.set_ylabel("completions / s")
    rate_ax.set_xlabel(f"seconds since {workload.start:%Y-%m-%d %H:%M:%S} UTC")
    for ax in (queue_ax, latency_ax, rate_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        ax.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, format="png")

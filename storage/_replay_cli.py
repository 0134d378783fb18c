"""``llmtrail replay``: capacity analysis of recorded traffic under other limits.

Invariants:
- :func:`register` only adds the parser; nothing is opened or imported heavily until it runs.
- The store is only read (never created or migrated). Errors are one line on stderr, never a
  traceback: exit 2 for bad usage (a bad knob, time or URL), 1 for a store problem or an empty
  time range (the message says how to widen it), 1 when ``--target-p95`` is met by nothing.
- ``--json`` prints exactly one JSON document on stdout (NaN becomes null); tables, warnings and
  the progress bar go to the terminal (progress on stderr, and only on a terminal).
- ``--plot FILE`` draws with matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from llmtrail.pipeline import ConfigurationError

from ._cli import add_store_argument, parse_time
from ._engine import StoreError
from ._replay import (
    KNOBS,
    Figures,
    Replay,
    ReplaySettings,
    ReplayStalledError,
    SweepRow,
    cheapest_meeting,
    queue_timeline,
    recorded_figures,
    recorded_run,
    replay,
    sweep,
)
from ._workload import EmptyWorkloadError, Workload
from ._workload_read import load_workload

__all__ = ["parse_sweep", "plot_replay", "register"]

_INT_KNOBS = frozenset(
    {"max_rpm", "max_tpm", "max_concurrent_requests", "provider_rpm", "provider_tpm"}
)
_NONE_OK = frozenset({"max_rpm", "max_tpm", "provider_rpm", "provider_tpm"})


def _limit(value: str) -> int | None:
    """An int >= 1, or ``none`` for no limit (argparse type)."""
    if value.strip().lower() in ("none", "off", "0"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (or 'none')") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1 (or 'none' for no limit)")
    return number


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be a number > 0")
    return number


def _knob_value(name: str, raw: str) -> Any:
    field = KNOBS[name]
    if field in _NONE_OK and raw.strip().lower() in ("none", "off"):
        return None
    try:
        value: Any = int(raw) if field in _INT_KNOBS else float(raw)
    except ValueError:
        kind = "a whole number" if field in _INT_KNOBS else "a number"
        extra = " or 'none'" if field in _NONE_OK else ""
        raise ConfigurationError(
            f"--sweep {name}: {raw!r} is not {kind}{extra}; e.g. --sweep {name}=10,20,50"
        ) from None
    if value <= 0:
        raise ConfigurationError(f"--sweep {name}: {raw!r} must be > 0")
    return value


def parse_sweep(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["max_rpm=500,1000", ...]`` -> ``[("max_rpm", [500, 1000]), ...]`` in the given order."""
    grid: list[tuple[str, list[Any]]] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigurationError(
                f"--sweep {spec!r} is not NAME=V1,V2,...; e.g. --sweep max_rpm=500,1000"
            )
        if name not in KNOBS:
            raise ConfigurationError(f"--sweep {name!r} is not a knob: use one of {sorted(KNOBS)}")
        if KNOBS[name] in seen:
            raise ConfigurationError(f"--sweep names {name!r} twice: give it once, with all values")
        seen.add(KNOBS[name])
        grid.append((name, [_knob_value(name, v) for v in values.split(",") if v.strip()]))
    return grid


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``replay`` to the ``llmtrail`` command line."""
    p = subparsers.add_parser(
        "replay",
        help="replay recorded traffic under other limits (capacity analysis)",
        description=(
            "Re-runs the calls recorded in a time range through the production gates and "
            "semaphore on a virtual clock, with the recorded settings or the ones given here, "
            "and compares the result with what was recorded. Nothing is sent anywhere."
        ),
        epilog=(
            "Traffic scale: 'compress' divides arrival times by K (the same calls, K times "
            "faster); 'resample' draws round(K x N) calls over the same span (seeded). "
            "With --provider-rpm/--provider-tpm a modelled provider answers 429 when over its "
            "own limit and the pipeline's retry policy handles it; recorded rate-limit 429s "
            "are then dropped (the model decides them), other recorded failures replay as "
            "recorded. --target-p95 is on total latency (arrival to completion); cheapest = "
            "lowest values, the first --sweep being the most significant."
        ),
    )
    add_store_argument(p)
    p.add_argument("--since", metavar="TIME", help="calls started at or after (ISO 8601 or 2h)")
    p.add_argument("--until", metavar="TIME", help="calls started before (ISO 8601 or 15m)")
    p.add_argument("--max-rpm", type=_limit, default=argparse.SUPPRESS, help="RPM gate limit")
    p.add_argument("--max-tpm", type=_limit, default=argparse.SUPPRESS, help="TPM gate limit")
    p.add_argument("--window", type=_positive, default=argparse.SUPPRESS, help="rpm_window_seconds")
    p.add_argument(
        "--max-concurrent",
        type=_limit,
        default=argparse.SUPPRESS,
        help="max_concurrent_requests (the semaphore)",
    )
    p.add_argument("--scale", type=_positive, default=1.0, metavar="K", help="traffic x K")
    p.add_argument(
        "--scale-method",
        choices=("compress", "resample"),
        default="compress",
        help="how --scale is applied (default compress)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of resampling (default 0)")
    p.add_argument("--provider-rpm", type=_limit, default=None, help="modelled provider RPM")
    p.add_argument("--provider-tpm", type=_limit, default=None, help="modelled provider TPM")
    p.add_argument(
        "--provider-window",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="the modelled provider's window (default 60)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help=f"replay every combination (repeatable); NAME is one of {', '.join(sorted(KNOBS))}",
    )
    p.add_argument(
        "--target-p95",
        type=_positive,
        metavar="SECONDS",
        help="name the cheapest combination whose total-latency p95 is at most this",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart: recorded against simulated")
    p.set_defaults(func=_replay_command)


# -- running --------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, workload: Workload) -> ReplaySettings:
    overrides: dict[str, Any] = {
        "scale": args.scale,
        "scale_method": args.scale_method,
        "seed": args.seed,
        "provider_rpm": args.provider_rpm,
        "provider_tpm": args.provider_tpm,
        "provider_window_s": args.provider_window,
    }
    for option, field in (
        ("max_rpm", "max_rpm"),
        ("max_tpm", "max_tpm"),
        ("window", "window_s"),
        ("max_concurrent", "max_concurrent_requests"),
    ):
        if hasattr(args, option):
            value = getattr(args, option)
            if field == "max_concurrent_requests" and value is None:
                raise ConfigurationError("--max-concurrent needs a number >= 1")
            overrides[field] = value
    return ReplaySettings.recorded(workload, **overrides)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """``update(description, done, total)`` drawing a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda description, done, total: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int) -> None:
            task = tasks.get(description)
            if task is None:
                task = tasks[description] = progress.add_task(description, total=total)
            progress.update(task, completed=done, total=total)

        yield update


async def _load(args: argparse.Namespace, update: Callable[[str, int, int], None]) -> Workload:
    from ._reader import EventStore

    since = parse_time(args.since, option="--since") if args.since else None
    until = parse_time(args.until, option="--until") if args.until else None
    if since is not None and until is not None and until <= since:
        raise ConfigurationError(
            f"--until ({until.isoformat()}) is not after --since ({since.isoformat()}): "
            "swap them or widen the range"
        )
    store = await EventStore.open(args.store)
    try:
        steps = iter(range(1, 8))
        return await load_workload(
            store.engine,
            since=since,
            until=until,
            on_progress=lambda kind, calls: update("reading events", next(steps, 7), 7),
        )
    finally:
        await store.aclose()


def _replay_command(args: argparse.Namespace) -> int:
    try:
        grid = parse_sweep(args.sweep)
        with _progress(not args.json) as update:
            workload = asyncio.run(_load(args, update))
            settings = _settings(args, workload)
            if workload.settings_variants > 1:
                print(
                    f"llmtrail replay: warning: the range holds calls of "
                    f"{workload.settings_variants} differently configured services; the "
                    "recorded settings are the most common ones",
                    file=sys.stderr,
                )
            recorded = recorded_figures(workload)
            if grid:
                rows = sweep(workload, settings, grid, on_progress=update)
                chosen = (
                    cheapest_meeting(rows, args.target_p95) if args.target_p95 is not None else None
                )
                # The chart shows the chosen combination, else the first that finished.
                shown = (
                    chosen.replay
                    if chosen is not None
                    else next((r.replay for r in rows if r.replay is not None), None)
                )
            else:
                shown = replay(
                    workload,
                    settings,
                    on_progress=lambda done, total: update("replaying", done, total),
                )
                rows, chosen = [], None
        if args.plot:
            if shown is None:
                raise ReplayStalledError("every combination stalled: there is nothing to plot")
            plot_replay(workload, shown, args.plot)
        met = _report(args, workload, recorded, settings, shown, rows, chosen)
    except ConfigurationError as exc:
        print(f"llmtrail replay: error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, EmptyWorkloadError, ReplayStalledError, OSError) as exc:
        print(f"llmtrail replay: error: {exc}", file=sys.stderr)
        return 1
    return 0 if met else 1


# -- output ---------------------------------------------------------------------------------


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
    return {
        "calls": len(workload.calls),
        "start": workload.start.isoformat(),
        "span_s": workload.span_s,
        "recorded_settings": {
            k: getattr(workload.settings, k) for k in workload.settings.__dataclass_fields__
        },
        "settings_variants": workload.settings_variants,
        "incomplete_calls_skipped": workload.incomplete,
    }


def _fields(knobs: dict[str, Any]) -> dict[str, Any]:
    return {KNOBS[name]: value for name, value in knobs.items()}


def _report(
    args: argparse.Namespace,
    workload: Workload,
    recorded: Figures,
    base: ReplaySettings,
    shown: Replay | None,
    rows: list[SweepRow],
    chosen: SweepRow | None,
) -> bool:
    """Print the report; returns False when --target-p95 was given and nothing met it."""
    target = args.target_p95
    if rows:
        met = target is None or chosen is not None
        if args.json:
            doc = {
                "workload": _workload_info(workload),
                "recorded": recorded.to_dict(),
                "rows": [
                    {"settings": base.with_(**_fields(r.knobs)).to_dict(), **r.to_dict()}
                    for r in rows
                ],
                "target_p95_s": target,
                "cheapest": None if chosen is None else chosen.knobs,
                "cheapest_order": [name for name, _ in parse_sweep(args.sweep)],
            }
            print(json.dumps(_clean(doc), indent=2, default=str))
        else:
            _print_sweep(workload, recorded, rows, chosen, target)
        return met
    assert shown is not None
    met = target is None or shown.figures.total_latency_s["p95"] <= target
    if args.json:
        doc = {
            "workload": _workload_info(workload),
            "settings": shown.settings.to_dict(),
            "recorded": recorded.to_dict(),
            "simulated": shown.figures.to_dict(),
            "target_p95_s": target,
            "meets_target": None if target is None else met,
        }
        print(json.dumps(_clean(doc), indent=2, default=str))
    else:
        _print_single(workload, recorded, shown, target)
    return met


def _fmt(value: float, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if abs(value) < 100 else f"{value:,.1f} s"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.2f}"


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value < 100 else f"{value:,.1f}"


def _mean_p95(p: dict[str, float]) -> str:
    return f"{_seconds(p['mean'])} / {_seconds(p['p95'])} s"


def _three(p: dict[str, float]) -> str:
    return " / ".join(_seconds(p[k]) for k in ("p50", "p95", "p99")) + " s"


def _figure_rows(f: Figures) -> list[tuple[str, str]]:
    q, t, g = f.queue_delay_s, f.total_latency_s, f.gate_wait_s
    cost = f"${f.cost_usd:.4f}" + (f" (+{f.unpriced_calls} unpriced)" if f.unpriced_calls else "")
    return [
        ("calls (succeeded / failed)", f"{f.calls:,} ({f.succeeded:,} / {f.failed:,})"),
        ("HTTP requests", _fmt(f.requests)),
        ("throughput, calls/s", _fmt(f.throughput_cps)),
        ("throughput, requests/min", _fmt(f.requests_per_min)),
        ("makespan", _fmt(f.makespan_s, "s")),
        ("time to drain", _fmt(f.drain_s, "s")),
        ("queueing delay p50 / p95 / p99", _three(q)),
        ("latency p50 / p95 / p99", _three(t)),
        *((f"{gate} wait mean / p95", _mean_p95(g[gate])) for gate in ("rpm", "tpm", "semaphore")),
        ("peak queue (gates + semaphore)", _fmt(f.peak_queue)),
        ("429 answers", _fmt(f.rate_limited)),
        ("cost at today's prices", cost),
    ]


def _knobs_line(settings: ReplaySettings) -> str:
    s = settings
    parts = [
        f"max_rpm={s.max_rpm}",
        f"max_tpm={s.max_tpm}",
        f"window={s.window_s:g}s",
        f"max_concurrent={s.max_concurrent_requests}",
        f"scale={s.scale:g} ({s.scale_method})",
    ]
    if s.provider_model:
        parts.append(
            f"provider_rpm={s.provider_rpm} provider_tpm={s.provider_tpm} "
            f"(window {s.provider_window_s:g}s)"
        )
    return ", ".join(parts)


def _print_single(
    workload: Workload, recorded: Figures, shown: Replay, target: float | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"llmtrail replay: {len(workload.calls):,} calls recorded from "
        f"{workload.start:%Y-%m-%d %H:%M:%S} UTC over {workload.span_s:,.1f} s",
        caption=f"simulated with {_knobs_line(shown.settings)}",
    )
    table.add_column("figure", no_wrap=True)
    table.add_column("recorded", justify="right")
    table.add_column("simulated", justify="right")
    for (name, rec), (_, sim) in zip(
        _figure_rows(recorded), _figure_rows(shown.figures), strict=True
    ):
        if name == "429 answers" and shown.settings.provider_model:
            name = "429 answers (predicted)"
        table.add_row(name, rec, sim)
    console.print(table)
    if shown.figures.synthesized:
        console.print(
            f"{shown.figures.synthesized} calls had no recorded answer (every attempt was a "
            "429) and were answered after the median latency, without tokens or cost."
        )
    if target is not None:
        p95 = shown.figures.total_latency_s["p95"]
        verdict = "meets" if p95 <= target else "does NOT meet"
        console.print(f"total-latency p95 {p95:.3f} s {verdict} the target of {target:g} s")


def _print_sweep(
    workload: Workload,
    recorded: Figures,
    rows: list[SweepRow],
    chosen: SweepRow | None,
    target: float | None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"llmtrail replay sweep: {len(workload.calls):,} calls, {len(rows)} combinations",
        caption=f"recorded: total latency p95 {recorded.total_latency_s['p95']:.3f} s, "
        f"makespan {recorded.makespan_s:.3f} s",
    )
    for name in rows[0].knobs:
        table.add_column(name, justify="right")
    for column in (
        "p50 s",
        "p95 s",
        "p99 s",
        "queue p95 s",
        "makespan s",
        "calls/s",
        "peak queue",
        "429s",
        "cost $",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        if row.replay is None:
            table.add_row(*(str(v) for v in row.knobs.values()), "stalled", style="red")
            continue
        f = row.replay.figures
        t = f.total_latency_s
        style = "bold green" if row is chosen else None
        table.add_row(
            *(str(v) for v in row.knobs.values()),
            f"{t['p50']:.3f}",
            f"{t['p95']:.3f}",
            f"{t['p99']:.3f}",
            f"{f.queue_delay_s['p95']:.3f}",
            f"{f.makespan_s:.2f}",
            f"{f.throughput_cps:.2f}",
            f"{f.peak_queue:,}",
            f"{f.rate_limited:,}",
            f"{f.cost_usd:.4f}",
            style=style,
        )
    console.print(table)
    for row in rows:
        if row.stalled is not None:
            knobs = ", ".join(f"{k}={v}" for k, v in row.knobs.items())
            console.print(f"[red]{knobs} stalled:[/red] {row.stalled}")
    if target is not None:
        if chosen is None:
            console.print(f"no combination meets a total-latency p95 of {target:g} s")
        else:
            assert chosen.replay is not None
            knobs = ", ".join(f"{k}={v}" for k, v in chosen.knobs.items())
            console.print(
                f"cheapest meeting p95 <= {target:g} s: {knobs} "
                f"(p95 {chosen.replay.figures.total_latency_s['p95']:.3f} s)"
            )


# -- the chart ------------------------------------------------------------------------------


def _binned_latency(
    arrival: Sequence[float], finished: Sequence[float], bins: int
) -> tuple[list[float], list[float], list[float]]:
    """(bin centres, p50, p95) of total latency by arrival time."""
    import numpy as np

    a = np.asarray(arrival, dtype=float)
    total = np.asarray(finished, dtype=float) - a
    if a.size == 0:
        return [], [], []
    lo, hi = float(a.min()), float(a.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, a, side="right") - 1, 0, bins - 1)
    centres, p50, p95 = [], [], []
    for b in range(bins):
        values = total[index == b]
        if values.size:
            centres.append(float((edges[b] + edges[b + 1]) / 2))
            p50.append(float(np.percentile(values, 50)))
            p95.append(float(np.percentile(values, 95)))
    return centres, p50, p95


def _peaks(times: Any, values: Any, *, bins: int) -> tuple[Any, Any]:
    """A step function cut to at most ``bins`` steps, each the highest value in its bin (a
    chart of 100,000 calls would otherwise draw 200,000 steps and hide the peaks anyway)."""
    import numpy as np

    if times.size <= 2 * bins:
        return times, values
    edges = np.linspace(times[0], times[-1], bins + 1)
    # The value at each bin's start (carried from the last step before it), raised by the
    # highest step inside the bin.
    carried = values[np.clip(np.searchsorted(times, edges[:-1], side="right") - 1, 0, None)]
    inside = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, bins - 1)
    peak = carried.copy()
    np.maximum.at(peak, inside, values)
    return edges[:-1], peak


def plot_replay(workload: Workload, result: Replay, path: str) -> None:
    """A PNG: queue length and total latency over time, recorded against simulated."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recorded = recorded_run(workload)
    figure = Figure(figsize=(11, 7), dpi=100)
    FigureCanvasAgg(figure)
    queue_ax, latency_ax = figure.subplots(2, 1, sharex=True)
    for run, label, color in (
        (recorded, "recorded", "tab:blue"),
        (result.run, "simulated", "tab:orange"),
    ):
        times, length = _peaks(*queue_timeline(run), bins=1500)
        # From an empty queue at the first arrival (a run that never queued stays at 0).
        times = np.concatenate([[min(run.arrival)], times])
        length = np.concatenate([[0], length])
        queue_ax.step(times, length, where="post", label=label, color=color, linewidth=1)
        centres, p50, p95 = _binned_latency(run.arrival, run.finished, 60)
        latency_ax.plot(centres, p95, label=f"{label} p95", color=color, linewidth=1.5)
        latency_ax.plot(centres, p50, label=f"{label} p50", color=color, linestyle="--")
    queue_ax.set_ylabel("calls waiting (gates + semaphore)")
    queue_ax.set_title(f"queue length; simulated with {_knobs_line(result.settings)}", fontsize=9)
    queue_ax.legend(loc="upper right")
    latency_ax.set_ylabel("total latency, s (by arrival)")
    latency_ax.set_xlabel(f"seconds since {workload.start:%Y-%m-%d %H:%M:%S} UTC")
    latency_ax.legend(loc="upper right")
    for ax in (queue_ax, latency_ax):
        ax.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")

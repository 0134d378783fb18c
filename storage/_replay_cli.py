"""``llmtrail replay``: capacity analysis of recorded traffic under other limits.

Invariants:
- :func:`register` only adds the parser; nothing is opened or imported heavily until it runs.
- The store is only read (never created or migrated). Errors are one line on stderr, never a
  traceback: exit 2 for bad usage (a bad knob, tier, time or URL), 1 for a store problem or an
  empty time range (the message says how to widen it), 1 when nothing qualifies for a
  recommendation (or a single replay misses ``--target-p95`` / ``--max-failure-rate``).
- A recommendation is only ever a setting whose failure rate is at most ``--max-failure-rate``
  (default 0): see :mod:`storage._replay_plan`.
- ``--json`` prints exactly one JSON document on stdout (NaN becomes null); tables, notes and
  the progress bar go to the terminal (progress on stderr, and only on a terminal).
- ``--plot FILE`` draws with matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from llmtrail.pipeline import ConfigurationError

from ._cli import add_store_argument, parse_time
from ._replay_model import KNOBS, ReplaySettings, provider_defaults
from ._workload import EmptyWorkloadError, Workload

if TYPE_CHECKING:
    from ._replay_plan import Tier

# The simulation, its figures and charts (numpy, matplotlib: the `replay` extra) load when a
# replay runs, not when the parser is built: `llmtrail --help` stays quick and works without
# the extra.

__all__ = ["parse_sweep", "register"]

_INT_KNOBS = frozenset(
    {
        "max_rpm",
        "max_tpm",
        "max_concurrent_requests",
        "provider_rpm",
        "provider_tpm",
        "max_attempts",
    }
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


def _share(value: str) -> float:
    """A failure rate: 0.01 or 1%."""
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate (e.g. 0.01 or 1%)") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be within 0 and 1 (0% to 100%)")
    return number


def _cpu(value: str) -> float | str | None:
    """``auto`` (calibrated), ``off`` (recorded latencies) or seconds >= 0."""
    text = value.strip().lower()
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use seconds, 'auto' or 'off'") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0 seconds")
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
    if value < 0 or (value == 0 and field != "client_cpu_s"):
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
            "The provider model (--provider-rpm/--provider-tpm, or the limits the provider "
            "stated in the recording when the gates are looser than them) counts every "
            "arrival and answers 429 with each request's own retry-after; attempts' outcomes "
            "are then drawn (the recorded error shares), and retried by the production retry "
            "policy. The recommendation is the cheapest setting (by --tier price, then knob "
            "values, the first --sweep the most significant) whose failure rate is at most "
            "--max-failure-rate and, with --target-p95, whose total-latency p95 (arrival to "
            "completion) is at most the target."
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
    p.add_argument("--max-attempts", type=int, default=argparse.SUPPRESS, help="attempts per call")
    p.add_argument(
        "--backoff",
        type=_positive,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="retry backoff base (default 0.5; a 429's retry-after wins)",
    )
    p.add_argument(
        "--backoff-max",
        type=_positive,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="the longest backoff wait (default 20)",
    )
    p.add_argument(
        "--errors",
        choices=("auto", "recorded", "modelled"),
        default="auto",
        help="replay each call's recorded attempts, or draw them from the recorded error "
        "shares (auto: modelled when the provider model is on or a retry knob changed)",
    )
    p.add_argument(
        "--client-cpu",
        type=_cpu,
        default=None,
        metavar="SECONDS|auto|off",
        help="model the client's CPU per attempt apart from the provider's own time "
        "(auto: calibrated from the recording; off, the default: recorded latencies)",
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
        default=None,
        metavar="SECONDS",
        help="the modelled provider's window (default: as stated in the recording, else 60)",
    )
    p.add_argument(
        "--provider-counts-rejected",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a request the provider refuses still counts in its window (OpenAI: yes)",
    )
    p.add_argument(
        "--tier",
        action="append",
        default=[],
        type=_tier,
        metavar="NAME=RPM,TPM,USD_PER_MONTH",
        help="a provider tier to price (repeatable): replayed with its limits",
    )
    p.add_argument("--tier-file", metavar="FILE", help="tiers, one NAME=rpm,tpm,usd a line")
    p.add_argument(
        "--max-failure-rate",
        type=_share,
        default=0.0,
        metavar="RATE",
        help="recommend only settings failing at most this share of calls (default 0)",
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
        help="recommend only settings whose total-latency p95 is at most this",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG: a sweep's p95 and failure rate against the knob, else the run over "
        "time, recorded against simulated",
    )
    p.set_defaults(func=_replay_command)


def _tier(value: str) -> Tier:
    from ._replay_plan import parse_tier

    try:
        return parse_tier(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- running --------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, workload: Workload) -> tuple[ReplaySettings, list[str]]:
    """The replay's settings from the recording and the options, and notes on choices made."""
    from ._replay_model import calibrated_client_cpu

    notes: list[str] = []
    overrides: dict[str, Any] = {
        "scale": args.scale,
        "scale_method": args.scale_method,
        "seed": args.seed,
        "provider_rpm": args.provider_rpm,
        "provider_tpm": args.provider_tpm,
        "provider_counts_rejected": args.provider_counts_rejected,
        "errors": None if args.errors == "auto" else args.errors,
    }
    if args.provider_window is not None:
        overrides["provider_window_s"] = args.provider_window
    elif workload.provider_limits is not None and workload.provider_limits.window_s:
        overrides["provider_window_s"] = workload.provider_limits.window_s
    for option, field in (
        ("max_rpm", "max_rpm"),
        ("max_tpm", "max_tpm"),
        ("window", "window_s"),
        ("max_concurrent", "max_concurrent_requests"),
        ("max_attempts", "max_attempts"),
        ("backoff", "backoff_base_s"),
        ("backoff_max", "backoff_max_s"),
    ):
        if hasattr(args, option):
            value = getattr(args, option)
            if field == "max_concurrent_requests" and value is None:
                raise ConfigurationError("--max-concurrent needs a number >= 1")
            overrides[field] = value
    if args.client_cpu == "auto":
        cpu = calibrated_client_cpu(workload)
        if cpu is None:
            notes.append(
                "--client-cpu auto: the recording has no provider time (no answer's first "
                "byte after its request was written, no openai-processing-ms), so recorded "
                "latencies are replayed as they were"
            )
        else:
            notes.append(
                f"client CPU per attempt calibrated from the recording: {cpu * 1000:.2f} ms"
            )
        overrides["client_cpu_s"] = cpu
    else:
        overrides["client_cpu_s"] = args.client_cpu
    return ReplaySettings.recorded(workload, **overrides), notes


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
    from ._workload_read import load_workload

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


def _provider_limit(
    grid: list[tuple[str, list[Any]]], settings: ReplaySettings, workload: Workload
) -> float | None:
    """The provider's known limit on the first swept knob, if it is a rate limit."""
    if not grid:
        return None
    field = KNOBS[grid[0][0]]
    stated = workload.provider_limits
    if field == "max_rpm":
        return settings.provider_rpm or (stated.rpm if stated else None)
    if field == "max_tpm":
        return settings.provider_tpm or (stated.tpm if stated else None)
    return None


def _tiers(args: argparse.Namespace) -> list[Tier]:
    from ._replay_plan import read_tiers

    tiers = list(args.tier)
    if args.tier_file:
        tiers += read_tiers(args.tier_file)
    names = [t.name for t in tiers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigurationError(f"tier name(s) {twice} given twice: name each tier once")
    return tiers


def _replay_command(args: argparse.Namespace) -> int:
    from ._base import StoreError
    from ._replay import ReplayStalledError, replay
    from ._replay_figures import recorded_figures
    from ._replay_plan import recommend, sweep
    from ._replay_plot import plot_replay, plot_sweep
    from ._replay_report import Report, print_report

    try:
        grid = parse_sweep(args.sweep)
        tiers = _tiers(args)
        with _progress(not args.json) as update:
            workload = asyncio.run(_load(args, update))
            settings, notes = _settings(args, workload)
            if workload.settings_variants > 1:
                notes.append(
                    f"the range holds calls of {workload.settings_variants} differently "
                    "configured services; the recorded settings are the most common ones"
                )
            recorded = recorded_figures(workload)
            if grid or tiers:
                swept = {KNOBS[name] for name, _ in grid}
                rows = sweep(
                    workload,
                    settings,
                    grid,
                    tiers=tiers,
                    # The gates follow each tier unless they were set or are swept.
                    gates_follow_tier=not ({"max_rpm", "max_tpm"} & (swept | set(vars(args)))),
                    provider_window_given=args.provider_window is not None,
                    on_progress=update,
                )
                report = Report(workload, recorded, settings, rows=rows, notes=notes)
            else:
                settings, more = provider_defaults(
                    workload, settings, window_given=args.provider_window is not None
                )
                shown = replay(
                    workload,
                    settings,
                    on_progress=lambda done, total: update("replaying", done, total),
                )
                rows = []
                report = Report(workload, recorded, settings, single=shown, notes=notes + more)
            report.recommendation = recommend(
                rows or [report.single_row()],
                max_failure_rate=args.max_failure_rate,
                target_p95_s=args.target_p95,
            )
        if args.plot:
            if rows:
                plot_sweep(
                    rows,
                    args.plot,
                    target_p95_s=args.target_p95,
                    max_failure_rate=args.max_failure_rate,
                    chosen=report.recommendation.row,
                    provider_limit=_provider_limit(grid, settings, workload),
                )
            else:
                assert report.single is not None
                plot_replay(workload, report.single, args.plot)
        print_report(report, as_json=args.json, order=[n for n, _ in grid])
    except ConfigurationError as exc:
        print(f"llmtrail replay: error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, EmptyWorkloadError, ReplayStalledError, OSError) as exc:
        print(f"llmtrail replay: error: {exc}", file=sys.stderr)
        return 1
    return 0 if report.recommendation.row is not None else 1

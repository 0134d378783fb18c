"""The benchmark harness: interleaved repetitions, medians, paired ratios, targets, results.

Invariants:
- A figure is the median of its repetitions, never a single run and never a mean (one slow
  outlier on a shared machine must not move it).
- A ratio is the median of *paired* ratios: repetition i of a variant divided by repetition i
  of its baseline, both taken in the same round. Variants run interleaved (A B C A B C ...), so
  a burst of load from a neighbour hits every variant of a round alike instead of one variant.
- A figure with a target is PASS or MISS, computed here from the numbers; nothing downstream
  can soften a MISS. A bench that fails or is missing shows up as ERROR or SKIP with the reason.
- Everything a bench returns is plain data (:meth:`Section.to_dict`), because each bench runs
  in its own child process and sends its section back through a pipe.

The format a bench module returns from ``main(quick: bool) -> dict`` is ``Section.to_dict()``:
``{"key", "title", "figures": [Figure.to_dict(), ...], "notes": [str, ...]}``. A plain dict of
numbers is accepted too (each number becomes an informational figure, see :func:`as_section`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

__all__ = [
    "API_KEY",
    "MODEL",
    "PACKAGES",
    "CpuMeter",
    "Figure",
    "LagProbe",
    "Section",
    "Target",
    "as_section",
    "closed_loop",
    "column",
    "machine_info",
    "median",
    "mock_server",
    "otlp_receiver",
    "paired_ratios",
    "percentile",
    "pick",
    "print_section",
    "prompt",
    "receiver_counts",
    "render_markdown",
    "run_bench_in_child",
    "run_interleaved",
    "server_log",
    "server_reset",
    "tiny",
]

Status = Literal["PASS", "MISS", "INFO", "SKIP", "ERROR"]

#: Versions recorded in RESULTS.md: the libraries on the measured paths.
PACKAGES = (
    "openai",
    "httpx2",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "opentelemetry-sdk",
    "redis",
    "aiohttp",
    "psutil",
)

TINY_ENV = "LLMTRAIL_BENCH_TINY"


def tiny() -> bool:
    """``LLMTRAIL_BENCH_TINY=1``: the smoke test's mode, with counts far too small to mean
    anything. Figures are still computed and targets still checked, so the plumbing is real."""
    return os.environ.get(TINY_ENV, "") == "1"


def pick(quick: bool, full: int, short: int, smoke: int) -> int:
    """A count for the current mode: the full run, ``--quick``, or the smoke test."""
    if tiny():
        return smoke
    return short if quick else full


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Round-by-round ratios; rounds where the baseline is 0 or missing are left out."""
    return [s / b for s, b in zip(samples, baseline, strict=False) if b]


# ---------------------------------------------------------------- figures and sections


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from an issue: ``value op threshold`` (or the ratio to the baseline)."""

    op: Literal[">=", "<=", ">", "<", "=="]
    threshold: float
    of: Literal["value", "ratio"] = "value"
    label: str = ""

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.of == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return {
            ">=": x >= self.threshold,
            "<=": x <= self.threshold,
            ">": x > self.threshold,
            "<": x < self.threshold,
            "==": x == self.threshold,
        }[self.op]

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.of == "ratio":
            return f"{self.op} {self.threshold:.0%} of baseline"
        return f"{self.op} {_number(self.threshold)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Figure:
    """One measured quantity: its repetitions, its baseline, its target."""

    name: str
    unit: str
    samples: list[float]
    baseline: str | None = None
    ratio_samples: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""
    error: str | None = None  # why there is no value (SKIP / ERROR), shown in the table

    @property
    def value(self) -> float:
        return median(self.samples)

    @property
    def ratio(self) -> float | None:
        return median(self.ratio_samples) if self.ratio_samples else None

    @property
    def status(self) -> Status:
        if self.error is not None:
            return "ERROR" if self.error.startswith("error") else "SKIP"
        if self.target is None:
            return "INFO"
        met = self.target.met(self.value, self.ratio)
        return "PASS" if met else "MISS"  # no value at all is a miss, never a pass

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "samples": list(self.samples),
            "baseline": self.baseline,
            "ratio_samples": list(self.ratio_samples),
            "target": self.target.to_dict() if self.target else None,
            "note": self.note,
            "error": self.error,
            # Derived, for readers of the dict; ignored by from_dict.
            "value": self.value,
            "ratio": self.ratio,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Figure:
        target = data.get("target")
        samples = data.get("samples")
        if samples is None and data.get("value") is not None:
            samples = [data["value"]]
        return cls(
            name=str(data["name"]),
            unit=str(data.get("unit", "")),
            samples=[float(s) for s in samples or []],
            baseline=data.get("baseline"),
            ratio_samples=[float(r) for r in data.get("ratio_samples") or []],
            target=Target(**target) if target else None,
            note=str(data.get("note") or ""),
            error=data.get("error"),
        )


@dataclass(slots=True)
class Section:
    """The figures of one bench, in the order they are shown."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float | None = None

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "figures": [f.to_dict() for f in self.figures],
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Section:
        return cls(
            key=str(data["key"]),
            title=str(data.get("title", data["key"])),
            figures=[Figure.from_dict(f) for f in data.get("figures", [])],
            notes=[str(n) for n in data.get("notes", [])],
            elapsed_s=data.get("elapsed_s"),
        )


def _replay_figures(section: Section, data: dict[str, Any]) -> None:
    """bench_replay's flat dict: the issue's "100,000 calls in <= 10 s" is 10,000 calls/s,
    which also judges a reduced (--quick) run fairly."""
    calls, total = data.pop("calls", None), data.pop("total_s", None)
    if not isinstance(calls, int | float) or not isinstance(total, int | float) or total <= 0:
        return
    section.add(
        Figure(
            f"extract + replay, {calls:,.0f} calls",
            "calls/s",
            [calls / total],
            target=Target(">=", 10_000, label=">= 10,000 (100,000 in <= 10 s)"),
            note=f"{total:.2f} s wall in total",
        )
    )
    for name in ("target_s", "meets_target"):
        data.pop(name, None)  # judged above, from the numbers


def _unit_of(key: str) -> str:
    """The unit a flat dict's key names by its suffix (``extract_s`` -> s)."""
    for suffix, unit in (("_per_s", "/s"), ("_ms", "ms"), ("_s", "s"), ("_mb", "MB")):
        if key.endswith(suffix):
            return unit
    return ""


_ADAPTERS: dict[str, Callable[[Section, dict[str, Any]], None]] = {"replay": _replay_figures}


def as_section(key: str, title: str, data: Mapping[str, Any]) -> Section:
    """A bench's return value as a Section: ``Section.to_dict()`` format, or a flat dict.

    In a flat dict each number becomes an informational figure named after its key, each
    other value a note; a nested dict is flattened with dotted keys. A known bench's flat
    dict first goes through its adapter, which turns the numbers its issue sets a target for
    into judged figures.
    """
    if isinstance(data.get("figures"), list):
        merged = {"key": key, "title": title, **data}
        return Section.from_dict(merged)
    section = Section(key, title)
    data = dict(data)
    if key in _ADAPTERS:
        _ADAPTERS[key](section, data)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            section.notes.append(f"{prefix}: {value}")
        elif isinstance(value, int | float):
            section.add(Figure(prefix, _unit_of(prefix), [float(value)]))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, Sequence) and all(isinstance(v, int | float) for v in value):
            section.add(Figure(prefix, "", [float(v) for v in value]))
        else:
            section.notes.append(f"{prefix}: {value!r}")

    walk("", dict(data))
    return section


# ---------------------------------------------------------------- running variants


Variant = tuple[str, Callable[[], Awaitable[dict[str, float]]]]


async def run_interleaved(
    variants: Sequence[Variant],
    reps: int,
    *,
    on_round: Callable[[int], Awaitable[None]] | None = None,
    budget_s: float | None = None,
    min_reps: int = 3,
) -> dict[str, list[dict[str, float]]]:
    """Run ``reps`` rounds of every variant in order (A B C A B C ...).

    Each variant returns its metrics for one repetition. ``on_round`` runs before each round
    (e.g. to reset a server). Returns, per variant, the metrics of each round in order, so
    index i of two variants comes from the same round.

    With ``budget_s``, no new round starts once that many seconds have passed and at least
    ``min_reps`` rounds are done: a slow variant (a target badly missed) then costs 3 rounds
    instead of 5, and the table shows how many there were.
    """
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    started = time.perf_counter()
    for round_ in range(reps):
        if budget_s is not None and round_ >= min_reps and time.perf_counter() - started > budget_s:
            break
        if on_round is not None:
            await on_round(round_)
        for name, run in variants:
            results[name].append(await run())
    return results


def column(runs: Sequence[Mapping[str, float]], metric: str) -> list[float]:
    return [float(r[metric]) for r in runs]


class LagProbe:
    """Event-loop lag: a ticker sleeps 1 ms and records how late it woke up.

    Lateness is what any other callback on the loop would suffer at that moment, so its
    p99 and max show whether something (a database driver, a big JSON dump) blocks the loop.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.lateness_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_s
        record = self.lateness_s.append
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            record(max(loop.time() - start - interval, 0.0))

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary_ms(self) -> dict[str, float]:
        lags = self.lateness_s
        return {
            "lag_p50_ms": percentile(lags, 50) * 1000,
            "lag_p99_ms": percentile(lags, 99) * 1000,
            "lag_max_ms": (max(lags) if lags else math.nan) * 1000,
            "ticks": float(len(lags)),
        }


# ---------------------------------------------------------------- OTLP receiver


def _receiver_main(conn: multiprocessing.connection.Connection) -> None:
    """Child process: accept OTLP/HTTP exports, answer 200, count them. Never decodes."""
    from aiohttp import web

    counts = {"traces": 0, "metrics": 0, "bytes": 0}

    async def accept(request: web.Request) -> web.Response:
        body = await request.read()
        counts["bytes"] += len(body)
        counts["traces" if request.path.endswith("traces") else "metrics"] += 1
        # An empty ExportTraceServiceResponse is a zero-length protobuf message.
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def main() -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/traces", accept)
        app.router.add_post("/v1/metrics", accept)
        app.router.add_get("/_count", count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        conn.send(f"http://127.0.0.1:{port}")
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


@contextlib.contextmanager
def otlp_receiver() -> Iterator[str]:
    """A local OTLP/HTTP receiver in its own process (so it takes no CPU from the client).

    Yields its base URL; ``GET {url}/_count`` returns how many exports it accepted.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_receiver_main, args=(child,), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(30):
            raise RuntimeError("the OTLP receiver process did not report its URL within 30 s")
        yield str(parent.recv())
    finally:
        _stop_process(proc)
        parent.close()


def _stop_process(proc: multiprocessing.process.BaseProcess, grace_s: float = 10.0) -> None:
    if proc.is_alive():
        proc.terminate()  # SIGTERM to this one child, by its pid
        proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


# ---------------------------------------------------------------- benches in child processes


def _bench_child(
    conn: multiprocessing.connection.Connection, module: str, key: str, title: str, quick: bool
) -> None:
    # SIGTERM (a timeout in the parent) becomes SystemExit so that `finally` blocks stop the
    # servers this bench started, instead of leaving them orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _quiet_logs()
    started = time.perf_counter()
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            section = Section(key, title)
            section.notes.append(f"not run: {module} does not exist yet")
            section.add(Figure(title, "", [], error=f"skipped: {module} is not written yet"))
        else:
            section = as_section(key, title, mod.main(quick))
    except BaseException as exc:
        section = Section(key, title)
        last = traceback.format_exception_only(exc)[-1].strip()
        section.add(Figure(title, "", [], error=f"error: {last}"))
        section.notes.append("the bench raised:\n" + traceback.format_exc())
    section.elapsed_s = time.perf_counter() - started
    conn.send(section.to_dict())
    conn.close()


def _quiet_logs() -> None:
    """Only errors reach the console: a bench's retries and 429s are counted, not logged."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    logging.basicConfig(level=logging.ERROR)


def run_bench_in_child(module: str, key: str, title: str, quick: bool, timeout_s: float) -> Section:
    """Import ``module`` and call its ``main(quick)`` in a fresh process; return its section.

    A fresh process per bench keeps global state (OTel providers, imported modules, memory
    high-water marks) from leaking from one bench into the next.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_bench_child, args=(child, module, key, title, quick))
    started = time.perf_counter()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            return Section.from_dict(parent.recv())
        reason = f"error: no result within {timeout_s:.0f} s (the bench was stopped)"
    except EOFError:
        reason = f"error: the bench process died (exit code {proc.exitcode})"
    finally:
        _stop_process(proc)
        parent.close()
    section = Section(key, title, elapsed_s=time.perf_counter() - started)
    section.add(Figure(title, "", [], error=reason))
    return section


# ---------------------------------------------------------------- machine and report


def machine_info() -> dict[str, str]:
    import psutil  # type: ignore[import-untyped, unused-ignore]

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": f"{os.cpu_count()} logical, {psutil.cpu_count(logical=False)} physical",
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "load average at start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
    }
    info["llmtrail commit"] = _commit()
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def _commit() -> str:
    """The measured code: the git commit, with ``+ local changes`` when the tree is dirty."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head} + local changes" if dirty else head


def _number(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude >= 1000:
        return f"{x:,.0f}"
    if magnitude >= 100:
        return f"{x:.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def figure_cells(figure: Figure) -> list[str]:
    """Figure, median, unit, reps (min..max), vs baseline, target, status."""
    if figure.error is not None:
        return [figure.name, "", figure.unit, "", "", "", f"{figure.status}: {figure.error}"]
    spread = ""
    if len(figure.samples) > 1:
        spread = f"{len(figure.samples)} ({_number(min(figure.samples))}.."
        spread += f"{_number(max(figure.samples))})"
    elif figure.samples:
        spread = "1"
    ratio = figure.ratio
    vs = f"{ratio:.1%} of {figure.baseline}" if ratio is not None and figure.baseline else ""
    target = figure.target.describe() if figure.target else ""
    return [figure.name, _number(figure.value), figure.unit, spread, vs, target, figure.status]


HEADERS = ["figure", "median", "unit", "reps (min..max)", "vs baseline", "target", "status"]


def render_markdown(
    sections: Sequence[Section], machine: Mapping[str, str], command: str, mode: str
) -> str:
    lines = [
        "# llmtrail benchmarks",
        "",
        f"Generated by `{command}` ({mode}). Every figure is the median of its repetitions; "
        "variants ran interleaved (A B C A B C ...) and each ratio is the median of the "
        "per-round ratios to the baseline measured in the same round. A MISS is a target "
        "not met in this run.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    misses = [
        (f.status, s.title, f.name)
        for s in sections
        for f in s.figures
        if f.status in ("MISS", "ERROR")
    ]
    lines += ["", "## Summary", ""]
    targets = [f for s in sections for f in s.figures if f.target is not None]
    passed = sum(1 for f in targets if f.status == "PASS")
    lines.append(f"{passed} of {len(targets)} targets met.")
    if misses:
        lines.append("")
        lines += [f"- {status}: {title}: {name}" for status, title, name in misses]
    for section in sections:
        elapsed = f" ({section.elapsed_s:.0f} s)" if section.elapsed_s is not None else ""
        lines += ["", f"## {section.title}{elapsed}", ""]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "---|" * len(HEADERS))
        for figure in section.figures:
            cells = [c.replace("|", "\\|") for c in figure_cells(figure)]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{f.name}: {f.note}" for f in section.figures if f.note] + section.notes
        if notes:
            lines.append("")
            for note in notes:
                if "\n" in note:
                    lines += ["```", note.rstrip(), "```"]
                else:
                    lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def print_section(section: Section, console: Any) -> None:
    from rich.table import Table

    elapsed = f" ({section.elapsed_s:.0f} s)" if section.elapsed_s is not None else ""
    table = Table(title=f"{section.title}{elapsed}", title_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="right" if header == "median" else "left")
    styles = {"PASS": "green", "MISS": "bold red", "ERROR": "bold red", "SKIP": "yellow"}
    for figure in section.figures:
        cells = figure_cells(figure)
        style = styles.get(figure.status, "")
        table.add_row(*cells[:-1], f"[{style}]{cells[-1]}[/]" if style else cells[-1])
    console.print(table)
    for figure in section.figures:
        if figure.note:
            console.print(f"  {figure.name}: {figure.note}", markup=False)
    for note in section.notes:
        console.print(f"  {note}", markup=False)


# ---------------------------------------------------------------- workloads and servers

MODEL = "gpt-4o-mini"
API_KEY = "sk-llmtrail-bench"
_PROMPT_BODY = (
    "Summarise the following support ticket in one sentence and name its product area. "
    "The customer reports that exports of monthly invoices time out after two minutes."
)


def prompt(i: int) -> str:
    """The i-th prompt: the same for every variant, distinct per call (~50 tokens)."""
    return f"Ticket {i}. {_PROMPT_BODY}"


async def closed_loop(
    n: int, concurrency: int, call: Callable[[int], Awaitable[bool]]
) -> dict[str, float]:
    """``n`` calls by ``concurrency`` workers, each starting its next call when one ends.

    Latency is measured by the caller around each call, so it includes everything the
    library adds. Returns calls/s, latency p50/p99 (ms) and the number of failed calls.
    """
    latencies: list[float] = []
    failures = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < n:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            ok = await call(index)
            latencies.append(time.perf_counter() - started)
            failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    elapsed = time.perf_counter() - started
    return {
        "calls_per_s": n / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "failures": float(failures),
        "elapsed_s": elapsed,
    }


class CpuMeter:
    """CPU seconds (user + system) a process used between ``start()`` and ``stop()``."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        self._proc = psutil.Process(pid)
        self._cpu0 = 0.0
        self._wall0 = 0.0

    def _cpu(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        self._cpu0, self._wall0 = self._cpu(), time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """``(cpu_s, share_of_one_core)``."""
        cpu = self._cpu() - self._cpu0
        wall = time.perf_counter() - self._wall0
        return cpu, cpu / wall if wall > 0 else math.nan


@contextlib.contextmanager
def mock_server(**config: Any) -> Iterator[tuple[str, int | None]]:
    """The local OpenAI-compatible server in its own process: ``(url, pid)``.

    Its own process, so that it does not compete with the client for a core (on a
    two-core machine, client and server each get one).
    """
    import psutil  # type: ignore[import-untyped, unused-ignore]

    from pipeline._mock_server import MockServerConfig, run_in_process

    before = {p.pid for p in psutil.Process().children()}
    url, stop = run_in_process(MockServerConfig(**config))
    try:
        new = [p.pid for p in psutil.Process().children() if p.pid not in before]
        yield url, (new[0] if len(new) == 1 else None)
    finally:
        stop()


async def server_reset(url: str) -> None:
    """Empty the server's log, rate window and cache between runs."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(f"{url}/_mock/reset") as r:
        r.raise_for_status()


async def server_log(url: str) -> list[dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/_mock/log") as r:
        r.raise_for_status()
        records: list[dict[str, Any]] = (await r.json())["records"]
        return records


async def receiver_counts(url: str) -> dict[str, int]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/_count") as r:
        r.raise_for_status()
        counts: dict[str, int] = await r.json()
        return counts

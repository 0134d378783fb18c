"""The benchmark harness: modes, interleaved repetitions, child processes, local servers.

Invariants:
- Variants run interleaved (A B C A B C ...), so a burst of load from a neighbour hits every
  variant of a round alike instead of one variant; index i of two variants' runs comes from the
  same round, which is what makes the paired ratios of :mod:`benchmarks._report` fair.
- Each bench runs in its own spawned child process (:func:`run_bench_in_child`) and sends its
  section back as plain data; a bench that fails, hangs or does not exist yet still yields a
  section, with an ERROR or SKIP figure saying why.
- Every server a bench starts (mock server, OTLP receiver) is a context manager and stops on
  exit, including when the parent's timeout turns into SIGTERM in the child.

Figures, sections and the report they render to live in :mod:`benchmarks._report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ._report import Figure, Section, as_section, percentile

__all__ = [
    "API_KEY",
    "MODEL",
    "PACKAGES",
    "CpuMeter",
    "LagProbe",
    "closed_loop",
    "column",
    "machine_info",
    "mock_server",
    "otlp_receiver",
    "pick",
    "prompt",
    "receiver_counts",
    "run_bench_in_child",
    "run_interleaved",
    "server_log",
    "server_reset",
    "tiny",
]

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


# ---------------------------------------------------------------- machine


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

    from llmtrail.testing._mock_server import MockServerConfig, run_in_process

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

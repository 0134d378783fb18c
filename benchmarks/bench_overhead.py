"""Overhead: the pipeline side by side with the bare openai SDK, zero-latency server, 50 workers.

Variants, interleaved in every round:
- server capacity: a raw aiohttp client (no SDK), to show the server is not the bottleneck;
- bare SDK: ``AsyncOpenAI(max_retries=0)`` behind its own ``asyncio.Semaphore(50)``;
- the SDK's own request path as the pipeline's provider uses it (``client.post`` with the raw
  response, the body built and the answer's JSON read by hand): not a target, it shows how much
  of the bare SDK's cost is ``responses.create``'s parameter transform and model construction;
- pipeline with no store and no tracing (``store_url=None, tracing=False``): throughput
  >= 90% of the bare SDK's;
- pipeline with the SQLite store (write-ahead, the default): throughput >= 85% of the bare SDK's;
- pipeline with OTLP tracing, batch-exported to a local receiver: CPU per
  call <= 1.25x the bare SDK's, throughput >= 75% of it;
- the same with 10% of calls sampled (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, the
  SDK's own sampler, read from the environment as an application would set it): reported, to
  show what the sampling lever costs per call (a call sampled out builds no span; its GenAI
  metrics and the instrumentation's pre-span work remain);
- the same with the collector down (a closed port): calls/s >= 95% of the collector-up run
  and how long the service's flush + close took (bounded by the 2 s default);
- the bare SDK traced by OpenLLMetry (``opentelemetry-instrumentation-openai``, spans and
  metrics to the same receiver), when installed, as the peer: in a child process of its own,
  because its instrumentation patches the openai module for the whole process; its ratios are
  taken against the bare SDK run the same way (a fresh child process, small heap), so that
  neither side of the peer's ratio has the bench process's larger heap to collect;
- pipeline with the store and tracing together (reported, without a target).

Invariants:
- Every variant sends the same prompts with the same ``max_output_tokens`` to the same server
  process, by 50 closed-loop workers (each starts its next call when one ends), after an
  untimed warm-up that opens the connections.
- The timed window of a pipeline variant ends after ``service.flush()``: events committed and
  spans exported are part of the cost, not deferred past the stopwatch. The collector-down
  comparison uses the calls' own window (``calls_only_per_s``, up to the last call's answer) of
  both runs, since flushing to a dead collector is bounded, not free; the bound is reported.
- The timed window starts after the warm-up's telemetry is flushed, so a run is charged for
  the spans and metrics of its own calls only.
- CPU is the client process's, all threads (the SDK's batch export thread included), for every
  variant alike; the server's and the OTLP receiver's processes are not counted for any
  variant (the server does the same work for all; the receiver stands for a collector, which
  runs elsewhere in production). Span and metric encoding and export run in the client
  process, so its CPU is all of tracing's CPU on the application's side.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

from ._harness import (
    API_KEY,
    MODEL,
    CpuMeter,
    closed_loop,
    column,
    mock_server,
    otlp_receiver,
    pick,
    prompt,
    receiver_counts,
    run_interleaved,
    server_reset,
)
from ._report import Figure, Section, Target, median, paired_ratios

CONCURRENCY = 50
MAX_OUTPUT_TOKENS = 64
BARE = "bare SDK"
NO_SINKS = "pipeline, no store, no tracing"
STORE = "pipeline + SQLite store"
TRACING = "pipeline + OTLP tracing"
TRACED = "pipeline + SQLite store + OTLP tracing"
DEAD = "pipeline + OTLP tracing, collector down"
SAMPLED = "pipeline + OTLP tracing, 10% sampled"
PEER = "bare SDK + OpenLLMetry tracing"
BARE_CHILD = "bare SDK, child process"
RAW_SDK = "SDK request path, hand-read answer"
CAPACITY = "server capacity (raw aiohttp client)"

Call = Callable[[int], Awaitable[bool]]


def store_available() -> str | None:
    """``None`` when the storage package provides its sink, else why not."""
    try:
        for entry in importlib.metadata.entry_points(group="llmtrail.sinks"):
            if entry.name == "store":
                entry.load()
                return None
    except (ImportError, AttributeError) as exc:
        return f"the SQLite store is not available yet ({exc})"
    return "no llmtrail.sinks 'store' entry point is installed"


async def _timed(
    n: int, warmup: int, call: Call, finish: Callable[[], Awaitable[None]] | None = None
) -> dict[str, float]:
    await closed_loop(warmup, CONCURRENCY, call)
    if finish is not None:
        # The warm-up's spans and metrics go out now, not inside the timed window: each run
        # pays for exactly its n calls' telemetry.
        await finish()
    meter = CpuMeter()
    meter.start()

    async def run() -> dict[str, float]:
        result = await closed_loop(n, CONCURRENCY, call)
        finishing = time.perf_counter()
        if finish is not None:
            await finish()
        result["finish_s"] = time.perf_counter() - finishing
        return result

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await run()
    elapsed = loop.time() - started
    cpu_s, _ = meter.stop()
    result["calls_only_per_s"] = result["calls_per_s"]  # up to the last call's answer
    result["calls_per_s"] = n / elapsed  # flush included
    result["cpu_ms_per_call"] = cpu_s / n * 1000
    return result


async def _raw_capacity(url: str, n: int, warmup: int) -> dict[str, float]:
    import aiohttp

    body = json.dumps(
        {"model": MODEL, "input": prompt(0), "max_output_tokens": MAX_OUTPUT_TOKENS}
    ).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> bool:
            async with session.post(f"{url}/v1/responses", data=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        return await _timed(n, warmup, call)


async def _sdk(
    url: str,
    n: int,
    warmup: int,
    send: Callable[[Any, int], Awaitable[bool]],
    finish: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    """``send(client, i)`` by 50 workers on one ``AsyncOpenAI(max_retries=0)``."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int) -> bool:
        async with semaphore:
            try:
                return await send(client, i)
            except openai.APIError:
                return False

    try:
        return await _timed(n, warmup, call, finish)
    finally:
        await client.close()


async def _create(client: Any, i: int) -> bool:
    """The bare SDK as people use it: ``responses.create``."""
    await client.responses.create(model=MODEL, input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS)
    return True


async def _post(client: Any, i: int) -> bool:
    """The SDK's request path as the pipeline's provider uses it, the answer read by hand."""
    import httpx2

    raw = await client.post(
        "/responses",
        body={"model": MODEL, "input": prompt(i), "max_output_tokens": MAX_OUTPUT_TOKENS},
        cast_to=httpx2.Response,
    )
    return "usage" in json.loads(raw.content)


async def _pipeline(
    url: str, n: int, warmup: int, store_url: str | None, tracing: bool
) -> dict[str, float]:
    from llmtrail.pipeline import BaseLLMService, GenerationRequest

    service = BaseLLMService(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key=API_KEY,
        max_rpm=None,
        max_tpm=None,
        max_concurrent_requests=CONCURRENCY,
        store_url=store_url,
        tracing=tracing,
        max_attempts=1,  # like the bare SDK's max_retries=0: one HTTP attempt per call
    )

    async def call(i: int) -> bool:
        result = await service.execute_generation_async(
            GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS),
            operation_name="bench",
        )
        return result.success

    closing = time.perf_counter()
    async with service:
        result = await _timed(n, warmup, call, service.flush)
        closing = time.perf_counter()
    result["close_s"] = result["finish_s"] + time.perf_counter() - closing  # flush + aclose
    return result


def _dead_endpoint() -> str:
    """An OTLP endpoint on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def openllmetry_installed() -> bool:
    return importlib.util.find_spec("opentelemetry.instrumentation.openai") is not None


async def _openllmetry(url: str, n: int, warmup: int, receiver: str) -> dict[str, float]:
    """The bare SDK instrumented by OpenLLMetry, spans and metrics batch-exported by OTLP to
    ``receiver`` (run in a child process: see the module docstring)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver}/v1/traces"))
    )
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{receiver}/v1/metrics"))
    meter_provider = MeterProvider(metric_readers=[reader])
    OpenAIInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)

    async def flush() -> None:  # part of the timed run, as the pipeline's flush is
        tracer_provider.force_flush()
        meter_provider.force_flush()

    result = await _sdk(url, n, warmup, _create, flush)
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return result


def _in_child(what: str, url: str, n: int, warmup: int, receiver: str) -> dict[str, float]:
    """Run ``what`` ("openllmetry" or "bare") in a fresh child process."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_overhead", what, url, str(n)]
        + [str(warmup), receiver],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 5, 3, 2)
    n = pick(quick, 1000, 200, 30)
    warmup = pick(quick, 100, 30, 10)
    section = Section("overhead", "1. Overhead against a zero-latency server")
    section.notes.append(
        f"{n} timed calls per repetition after {warmup} warm-up calls, {CONCURRENCY} "
        f"closed-loop workers, max_output_tokens={MAX_OUTPUT_TOKENS}, {reps} rounds; the "
        "server (zero latency) and the OTLP receiver run in their own processes."
    )
    no_store = store_available()
    if no_store is not None:
        section.notes.append(f"store variants not run: {no_store}")
    peer = openllmetry_installed()
    if not peer:
        section.notes.append(
            "OpenLLMetry peer not run: pip install opentelemetry-instrumentation-openai "
            "(in the benchmarks extra)"
        )
    with (
        tempfile.TemporaryDirectory(prefix="llmtrail-bench-") as tmp,
        mock_server() as (url, server_pid),
        otlp_receiver() as receiver,
    ):
        from llmtrail import telemetry

        def collector_up() -> None:
            telemetry.configure(endpoint=receiver, service_name="llmtrail-bench")

        collector_up()
        dead = _dead_endpoint()
        runs = 0

        def store_url() -> str:
            nonlocal runs
            runs += 1
            return f"sqlite+aiosqlite:///{Path(tmp) / f'overhead-{runs}.db'}"

        server_cpu: list[float] = []

        async def bare() -> dict[str, float]:
            meter = CpuMeter(server_pid) if server_pid else None
            if meter is not None:
                meter.start()
            result = await _sdk(url, n, warmup, _create)
            if meter is not None:
                server_cpu.append(meter.stop()[1])
            return result

        def traced(store: bool) -> Callable[[], Awaitable[dict[str, float]]]:
            async def run() -> dict[str, float]:
                return await _pipeline(url, n, warmup, store_url() if store else None, True)

            return run

        async def collector_down() -> dict[str, float]:
            telemetry.configure(endpoint=dead, service_name="llmtrail-bench")
            try:
                return await _pipeline(url, n, warmup, None, True)
            finally:
                collector_up()

        async def sampled() -> dict[str, float]:
            ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
            try:
                with mock.patch.dict(os.environ, ratio | {"OTEL_TRACES_SAMPLER_ARG": "0.1"}):
                    collector_up()  # a new provider reads the sampler from the environment
                return await _pipeline(url, n, warmup, None, True)
            finally:
                collector_up()

        variants: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
            (CAPACITY, lambda: _raw_capacity(url, 2 * n, warmup)),
            (BARE, bare),
            (RAW_SDK, lambda: _sdk(url, n, warmup, _post)),
            (NO_SINKS, lambda: _pipeline(url, n, warmup, None, False)),
            (TRACING, traced(store=False)),
            (SAMPLED, sampled),
            (DEAD, collector_down),
        ]
        if peer:

            def child(what: str) -> Callable[[], Awaitable[dict[str, float]]]:
                return lambda: asyncio.to_thread(_in_child, what, url, n, warmup, receiver)

            variants += [(BARE_CHILD, child("bare")), (PEER, child("openllmetry"))]
        if no_store is None:
            variants.append((STORE, lambda: _pipeline(url, n, warmup, store_url(), False)))
            variants.append((TRACED, traced(store=True)))

        async def reset(_: int) -> None:
            await server_reset(url)

        results = await run_interleaved(variants, reps, on_round=reset)
        exports = await receiver_counts(receiver)
        telemetry.reset()

    capacity = column(results[CAPACITY], "calls_per_s")
    section.add(
        Figure(
            CAPACITY,
            "calls/s",
            capacity,
            note="a lower bound: the single-process client is the limit, not the server",
        )
    )
    bare_rate = column(results[BARE], "calls_per_s")
    section.add(
        Figure(
            f"{BARE}: throughput",
            "calls/s",
            bare_rate,
            baseline=CAPACITY,
            ratio_samples=paired_ratios(bare_rate, capacity),
            note=(
                f"the server process used {median(server_cpu):.0%} of one core meanwhile"
                if server_cpu
                else ""
            ),
        )
    )
    for metric, label in (("p50_ms", "latency p50"), ("p99_ms", "latency p99")):
        section.add(Figure(f"{BARE}: {label}", "ms", column(results[BARE], metric)))
    section.add(
        Figure(f"{BARE}: client CPU per call", "ms", column(results[BARE], "cpu_ms_per_call"))
    )
    targets: dict[str, Target | None] = {
        RAW_SDK: None,
        NO_SINKS: Target(">=", 0.90, "ratio", ">= 90% of bare SDK"),
        STORE: Target(">=", 0.85, "ratio", ">= 85% of bare SDK"),
        TRACING: Target(">=", 0.75, "ratio", ">= 75% of bare SDK"),
        TRACED: None,
        SAMPLED: None,
        DEAD: None,
        BARE_CHILD: None,
        PEER: None,
    }
    cpu_targets: dict[str, Target | None] = {
        TRACING: Target("<=", 1.25, "ratio", "<= 1.25x bare SDK"),
    }
    for name in (RAW_SDK, NO_SINKS, STORE, TRACING, SAMPLED, TRACED, DEAD, BARE_CHILD, PEER):
        if name not in results:
            continue
        runs_ = results[name]
        # The peer runs in a child process: its baseline is the bare SDK run the same way.
        base_name = BARE_CHILD if name == PEER else BARE
        base_runs = results[base_name]
        rate = column(runs_, "calls_per_s")
        section.add(
            Figure(
                f"{name}: throughput",
                "calls/s",
                rate,
                baseline=base_name,
                ratio_samples=paired_ratios(rate, column(base_runs, "calls_per_s")),
                target=targets[name],
            )
        )
        for metric, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            mine = column(runs_, metric)
            base = column(base_runs, metric)
            section.add(
                Figure(
                    f"{name}: added latency {label}",
                    "ms",
                    [a - b for a, b in zip(mine, base, strict=True)],
                    baseline=base_name,
                    ratio_samples=paired_ratios(mine, base),
                    note=f"median {label} {median(mine):.1f} ms vs {median(base):.1f} ms, "
                    f"{base_name}",
                )
            )
        cpu = column(runs_, "cpu_ms_per_call")
        section.add(
            Figure(
                f"{name}: client CPU per call",
                "ms",
                cpu,
                baseline=base_name,
                ratio_samples=paired_ratios(cpu, column(base_runs, "cpu_ms_per_call")),
                target=cpu_targets.get(name),
                note="all of the client process's threads (export included)",
            )
        )
        failed = sum(column(runs_, "failures"))
        if failed:
            section.notes.append(f"{name}: {failed:.0f} calls failed (all runs together)")
    if DEAD in results and TRACING in results:
        down = column(results[DEAD], "calls_only_per_s")
        up = column(results[TRACING], "calls_only_per_s")
        section.add(
            Figure(
                f"{DEAD}: calls/s vs collector up",
                "calls/s",
                down,
                baseline=TRACING,
                ratio_samples=paired_ratios(down, up),
                target=Target(">=", 0.95, "ratio", ">= 95% of collector up"),
                note="each run's calls alone, up to the last answer (flush reported below)",
            )
        )
        section.add(
            Figure(
                f"{DEAD}: flush + close of the service",
                "s",
                column(results[DEAD], "close_s"),
                target=Target("<=", 4.5, "value", "<= 4.5 s (2 s flush bound, 2 s close bound)"),
                note=f"collector up: {median(column(results[TRACING], 'close_s')):.2f} s",
            )
        )
    failed_bare = sum(column(results[BARE], "failures"))
    if failed_bare:
        section.notes.append(f"{BARE}: {failed_bare:.0f} calls failed (all runs together)")
    if TRACED in results:
        section.notes.append(
            f"the OTLP receiver accepted {exports['traces']} trace and {exports['metrics']} "
            f"metric exports ({exports['bytes'] / 1e6:.1f} MB) during the run"
        )
    return section.to_dict()


if __name__ == "__main__":  # the OpenLLMetry peer and its baseline, in processes of their own
    if sys.argv[1:2] not in (["openllmetry"], ["bare"]) or len(sys.argv) != 6:
        sys.exit(
            "usage: python -m benchmarks.bench_overhead openllmetry|bare URL N WARMUP RECEIVER"
        )
    _, what_, url_, n_, warmup_, receiver_ = sys.argv
    if what_ == "openllmetry":
        figures = asyncio.run(_openllmetry(url_, int(n_), int(warmup_), receiver_))
    else:
        figures = asyncio.run(_sdk(url_, int(n_), int(warmup_), _create))
    print(json.dumps(figures))

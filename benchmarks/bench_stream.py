"""Streamed calls: the pipeline's stream side by side with the bare SDK's, and the gates.

Variants, interleaved in every round, for Chat Completions and the Responses API:
- bare SDK: ``chat.completions.create(stream=True, stream_options={"include_usage": True})``
  (or ``responses.create(stream=True)``) read to its end;
- pipeline: ``execute_generation_stream`` read to its end (no store, no tracing, one attempt).
Both sides run the same workers behind the same concurrency cap (``asyncio.Semaphore(c)``
around the bare call, ``max_concurrent_requests=c`` in the pipeline), and time each stream from
the moment the worker starts the call (before the bare side's semaphore), to its first text
delta (TTFT) and to its end.

Loads:
- unsaturated, where TTFT added is judged (target <= 1 ms, p50 paired by round): one worker
  against the zero-latency server, and 4 workers against a server that answers after
  :data:`LATENCY_S` (the client's CPU then idles most of the time);
- saturated: :data:`CONCURRENCY` workers, zero latency, where throughput of fully read streams
  is judged (target >= 0.85 of the bare SDK's); the TTFT there is queueing on the client's
  CPU and is shown without a target.
Then the 1 s gate cases of :mod:`benchmarks.bench_gates` (RPM-bound and TPM-bound in turn,
server and pipeline limits equal, its ``arrival_guard_s``), streamed calls beside plain calls
through the same gate in the same round: 429s at the server (target 0) and the achieved share
of the limit (target >= 97 %), measured from the server's arrival log as bench_gates does.

Invariants:
- The server (8 text chunks per answer) runs in its own process and is reconfigured by each
  variant before it runs; every variant sends the same prompts with the same
  ``max_output_tokens``, after an untimed warm-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._harness import (
    API_KEY,
    MODEL,
    closed_loop,
    column,
    mock_server,
    pick,
    prompt,
    run_interleaved,
)
from ._report import Figure, Section, Target, median, paired_ratios, percentile
from .bench_gates import GUARD_S, Case, _achieved, _cases, _configure
from .bench_gates import MAX_OUTPUT_TOKENS as GATE_MAX_OUTPUT_TOKENS

CONCURRENCY = 50
MAX_OUTPUT_TOKENS = 64
APIS = ("chat", "responses")
#: The server's delay before the text in the unsaturated case with several workers: long enough
#: that their streams need well under the client's CPU (the bare SDK's stream costs milliseconds).
LATENCY_S = 0.1
#: (variant suffix, workers = concurrency cap, server latency): the loads of the comparison.
LOADS = (("1", 1, 0.0), ("4", 4, LATENCY_S), ("", CONCURRENCY, 0.0))


async def _timed(
    url: str,
    n: int,
    warmup: int,
    concurrency: int,
    latency_s: float,
    call: Callable[[int, list[float]], Awaitable[bool]],
) -> dict[str, float]:
    await _configure(url, latency_s=latency_s, rpm_limit=None, tpm_limit=None, window_s=60.0)
    ttfts: list[float] = []
    await closed_loop(warmup, concurrency, lambda i: call(i, []))
    result = await closed_loop(n, concurrency, lambda i: call(i, ttfts))
    result["ttft_p50_ms"] = percentile(ttfts, 50) * 1000
    result["ttft_p99_ms"] = percentile(ttfts, 99) * 1000
    return result


async def _bare(
    url: str, api: str, n: int, warmup: int, concurrency: int, latency_s: float
) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)  # the pipeline's max_concurrent_requests

    async def call(i: int, ttfts: list[float]) -> bool:
        started = time.perf_counter()  # as the pipeline's: before waiting for a slot
        first = True
        async with semaphore:
            if api == "chat":
                stream: Any = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt(i)}],
                    max_completion_tokens=MAX_OUTPUT_TOKENS,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if first and chunk.choices and chunk.choices[0].delta.content:
                        ttfts.append(time.perf_counter() - started)
                        first = False
            else:
                stream = await client.responses.create(
                    model=MODEL, input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS, stream=True
                )
                async for event in stream:
                    if first and event.type == "response.output_text.delta":
                        ttfts.append(time.perf_counter() - started)
                        first = False
            return not first

    try:
        return await _timed(url, n, warmup, concurrency, latency_s, call)
    finally:
        await client.close()


def _service(url: str, api: str, concurrency: int = CONCURRENCY, **limits: Any) -> Any:
    from llmtrail.pipeline import BaseLLMService

    return BaseLLMService(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key=API_KEY,
        provider="openai-chat" if api == "chat" else "openai",
        max_concurrent_requests=concurrency,
        store_url=None,
        tracing=False,
        **limits,
    )


async def _read(
    service: Any, i: int, ttfts: list[float], max_output_tokens: int = MAX_OUTPUT_TOKENS
) -> bool:
    from llmtrail.pipeline import GenerationRequest, GenerationResult

    request = GenerationRequest(user_prompt=prompt(i), max_output_tokens=max_output_tokens)
    started = time.perf_counter()
    first = True
    ok = False
    async with service.execute_generation_stream(request, "bench") as stream:
        async for item in stream:
            if isinstance(item, GenerationResult):
                ok = item.success
            elif first:
                ttfts.append(time.perf_counter() - started)
                first = False
    return ok


async def _pipeline(
    url: str, api: str, n: int, warmup: int, concurrency: int, latency_s: float
) -> dict[str, float]:
    service = _service(url, api, concurrency, max_rpm=None, max_tpm=None, max_attempts=1)
    async with service:
        return await _timed(
            url, n, warmup, concurrency, latency_s, lambda i, ttfts: _read(service, i, ttfts)
        )


async def _plain(service: Any, i: int, ttfts: list[float], max_output_tokens: int) -> bool:
    from llmtrail.pipeline import GenerationRequest

    request = GenerationRequest(user_prompt=prompt(i), max_output_tokens=max_output_tokens)
    result = await service.execute_generation_async(request, "bench")
    return bool(result.success)


async def _gated(url: str, api: str, case: Case, kind: str, streamed: bool) -> dict[str, float]:
    """bench_gates' llmtrail client on one case, its calls streamed or plain."""
    from ._harness import server_log

    n = case.calls_rpm if kind == "rpm" else case.calls_tpm
    limits = {"rpm_limit": case.rpm if kind == "rpm" else None}
    limits["tpm_limit"] = case.tpm if kind == "tpm" else None
    await _configure(url, window_s=case.window_s, latency_s=case.latency_s, **limits)
    service = _service(
        url,
        api,
        max_rpm=limits["rpm_limit"],
        max_tpm=limits["tpm_limit"],
        rpm_window_seconds=case.window_s,
        arrival_guard_s=GUARD_S,
    )
    call = _read if streamed else _plain
    async with service:
        ok = await asyncio.gather(*(call(service, i, [], GATE_MAX_OUTPUT_TOKENS) for i in range(n)))
    figures = _achieved(await server_log(url), case, kind)
    figures["succeeded"] = float(sum(ok))
    return figures


def _bind(
    run: Callable[..., Awaitable[dict[str, float]]], *args: Any
) -> Callable[[], Awaitable[dict[str, float]]]:
    return lambda: run(*args)


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 3, 2, 2)
    n = pick(quick, 1000, 200, 30)
    warmup = pick(quick, 100, 30, 10)
    n_small = pick(quick, 300, 100, 10)
    cases = [c for c in _cases(quick) if c.window_s == 1.0]
    section = Section("stream", "7. Streamed calls")
    section.notes.append(
        f"Same workers and concurrency cap on both sides, TTFT from the worker's call; "
        f"max_output_tokens={MAX_OUTPUT_TOKENS}, 8 chunks per answer, server in its own "
        f"process; {reps} rounds. Unsaturated: 1 worker ({n_small} streams, zero latency) and "
        f"4 workers ({n_small} streams, {LATENCY_S * 1000:.0f} ms server latency). Saturated: "
        f"{CONCURRENCY} workers, {n} streams, zero latency. Gates: bench_gates' 1 s cases, "
        f"arrival_guard_s={GUARD_S}, all calls submitted at once, streamed and plain in the "
        "same round."
    )
    with mock_server(stream_chunks=8) as (url, _):
        variants: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = []
        for api in APIS:
            for suffix, workers, latency in LOADS:
                count = n if workers == CONCURRENCY else n_small
                args = (url, api, count, warmup, workers, latency)
                variants.append((f"bare{suffix} {api}", _bind(_bare, *args)))
                variants.append((f"pipeline{suffix} {api}", _bind(_pipeline, *args)))
            for case in cases:
                for kind in ("rpm", "tpm"):
                    key = f"{case.key} {kind} {api}"
                    variants.append((f"gated {key}", _bind(_gated, url, api, case, kind, True)))
                    variants.append((f"plain {key}", _bind(_gated, url, api, case, kind, False)))
        results = await run_interleaved(variants, reps)

    for api in APIS:
        label = "Chat Completions" if api == "chat" else "Responses API"
        _add_latency(section, label, results, api)
        for case in cases:
            for kind in ("rpm", "tpm"):
                _add_gates(section, label, case, kind, results, api)
    return section.to_dict()


def _add_latency(
    section: Section, label: str, results: dict[str, list[dict[str, float]]], api: str
) -> None:
    for suffix, workers, latency in LOADS:
        bare, mine = results[f"bare{suffix} {api}"], results[f"pipeline{suffix} {api}"]
        load = f"{workers} worker{'s' if workers > 1 else ''}"
        if latency:
            load += f", {latency * 1000:.0f} ms server latency"
        bare_ttft, mine_ttft = column(bare, "ttft_p50_ms"), column(mine, "ttft_p50_ms")
        saturated = workers == CONCURRENCY
        section.add(
            Figure(
                f"{label}, {load}: TTFT added by llmtrail (p50, paired by round)",
                "ms",
                [m - b for m, b in zip(mine_ttft, bare_ttft, strict=True)],
                target=None if saturated else Target("<=", 1.0, label="<= 1 ms"),
                note=(
                    f"bare SDK p50 {median(bare_ttft):.2f} ms, pipeline {median(mine_ttft):.2f} "
                    f"ms; p99 {median(column(bare, 'ttft_p99_ms')):.2f} / "
                    f"{median(column(mine, 'ttft_p99_ms')):.2f} ms"
                    + ("; saturated: queueing on the client's CPU" if saturated else "")
                ),
            )
        )
        bare_rate, rate = column(bare, "calls_per_s"), column(mine, "calls_per_s")
        section.add(
            Figure(
                f"{label}, {load}: pipeline, streams/s",
                "streams/s",
                rate,
                baseline="bare SDK",
                ratio_samples=paired_ratios(rate, bare_rate),
                target=Target(">=", 0.85, of="ratio", label=">= 0.85 of bare")
                if saturated
                else None,
                note=f"bare SDK {median(bare_rate):.0f} streams/s",
            )
        )


def _add_gates(
    section: Section,
    label: str,
    case: Case,
    kind: str,
    results: dict[str, list[dict[str, float]]],
    api: str,
) -> None:
    key = f"{case.key} {kind} {api}"
    gated, plain = results[f"gated {key}"], results[f"plain {key}"]
    n = case.calls_rpm if kind == "rpm" else case.calls_tpm
    where = f"{label}, {case.label}, {kind.upper()}"
    section.add(
        Figure(
            f"{where}: streamed, 429s at the server",
            "429s",
            column(gated, "429s"),
            target=Target("==", 0, label="0"),
            note=f"plain calls, same rounds: median {median(column(plain, '429s')):.0f}, "
            f"max {max(column(plain, '429s'), default=0):.0f}",
        )
    )
    section.add(
        Figure(
            f"{where}: streamed, achieved share of the limit",
            "%",
            [s * 100 for s in column(gated, "share")],
            baseline="plain calls",
            ratio_samples=paired_ratios(column(gated, "share"), column(plain, "share")),
            target=Target(">=", 97, label=">= 97%"),
            note=f"{median(column(gated, 'succeeded')):.0f} of {n} streams succeeded; plain "
            f"calls {median(column(plain, 'share')) * 100:.1f} %",
        )
    )

"""Streamed calls: the pipeline's stream side by side with the bare SDK's, and the gates.

Variants, interleaved in every round, for Chat Completions and the Responses API:
- bare SDK: ``chat.completions.create(stream=True, stream_options={"include_usage": True})``
  (or ``responses.create(stream=True)``) read to its end, behind ``asyncio.Semaphore(50)``;
- pipeline: ``execute_generation_stream`` read to its end (no store, no tracing, one attempt).

Figures: time to first token (TTFT) as the caller sees it (from the call to the first text
delta), p50 per round, and the pipeline's p50 minus the bare SDK's of the same round (target
<= 1 ms), at 50 workers and, to show the latency the pipeline adds when the client's CPU is
not the limit, at 1; throughput of fully read streams (target >= 0.85 of the bare SDK's).
Then the gate case of :mod:`benchmarks.bench_gates` (RPM-bound, server and pipeline limits
equal, 1 s window) with streamed calls, beside plain calls through the same gate: 429s at the
server (target 0) and the achieved share of the limit (target >= 97 %), measured from the
server's arrival log the same way.

Invariants:
- The server (zero latency, 8 text chunks per answer) runs in its own process; every variant
  sends the same prompts with the same ``max_output_tokens`` by 50 closed-loop workers, after
  an untimed warm-up.
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
    server_log,
    server_reset,
)
from ._report import Figure, Section, Target, median, paired_ratios, percentile
from .bench_gates import RPM, WINDOW_S, _achieved, _configure

CONCURRENCY = 50
MAX_OUTPUT_TOKENS = 64
APIS = ("chat", "responses")


async def _timed(
    n: int,
    warmup: int,
    call: Callable[[int, list[float]], Awaitable[bool]],
    concurrency: int = CONCURRENCY,
) -> dict[str, float]:
    ttfts: list[float] = []
    await closed_loop(warmup, concurrency, lambda i: call(i, []))
    result = await closed_loop(n, concurrency, lambda i: call(i, ttfts))
    result["ttft_p50_ms"] = percentile(ttfts, 50) * 1000
    result["ttft_p99_ms"] = percentile(ttfts, 99) * 1000
    return result


async def _bare(
    url: str, api: str, n: int, warmup: int, concurrency: int = CONCURRENCY
) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int, ttfts: list[float]) -> bool:
        async with semaphore:
            started = time.perf_counter()
            first = True
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
        return await _timed(n, warmup, call, concurrency)
    finally:
        await client.close()


def _service(url: str, api: str, **limits: Any) -> Any:
    from llmtrail.pipeline import BaseLLMService

    return BaseLLMService(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key=API_KEY,
        provider="openai-chat" if api == "chat" else "openai",
        max_concurrent_requests=CONCURRENCY,
        store_url=None,
        tracing=False,
        **limits,
    )


async def _read(service: Any, i: int, ttfts: list[float]) -> bool:
    from llmtrail.pipeline import GenerationRequest, GenerationResult

    request = GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS)
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
    url: str, api: str, n: int, warmup: int, concurrency: int = CONCURRENCY
) -> dict[str, float]:
    service = _service(url, api, max_rpm=None, max_tpm=None, max_attempts=1)
    async with service:
        return await _timed(n, warmup, lambda i, ttfts: _read(service, i, ttfts), concurrency)


async def _plain(service: Any, i: int, ttfts: list[float]) -> bool:
    from llmtrail.pipeline import GenerationRequest

    request = GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS)
    result = await service.execute_generation_async(request, "bench")
    return bool(result.success)


async def _gated(url: str, api: str, n: int, streamed: bool) -> dict[str, float]:
    await _configure(url, window_s=WINDOW_S, rpm_limit=RPM, tpm_limit=None)
    service = _service(url, api, max_rpm=RPM, max_tpm=None, rpm_window_seconds=WINDOW_S)
    call = _read if streamed else _plain
    async with service:
        ok = await asyncio.gather(*(call(service, i, []) for i in range(n)))
    figures = _achieved(await server_log(url), "rpm")
    figures["succeeded"] = float(sum(ok))
    await _configure(url, rpm_limit=None, tpm_limit=None, window_s=60.0)
    return figures


def _bind(
    run: Callable[..., Awaitable[dict[str, float]]], *args: Any
) -> Callable[[], Awaitable[dict[str, float]]]:
    return lambda: run(*args)


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 5, 3, 2)
    n = pick(quick, 1000, 200, 30)
    warmup = pick(quick, 100, 30, 10)
    n_gate = pick(quick, 400, 60, 30)
    n_one = pick(quick, 300, 100, 10)
    section = Section("stream", "7. Streamed calls")
    section.notes.append(
        f"{n} timed streams per repetition after {warmup} warm-up ones, {CONCURRENCY} closed-loop "
        f"workers, max_output_tokens={MAX_OUTPUT_TOKENS}, 8 chunks per answer, zero-latency "
        f"server in its own process; {reps} rounds. Gate case: {RPM:,} RPM over a {WINDOW_S:g} s "
        f"window at the server and the gate, {n_gate} streamed calls submitted at once."
    )
    with mock_server(stream_chunks=8) as (url, _):
        variants: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = []
        for api in APIS:
            variants.append((f"bare {api}", _bind(_bare, url, api, n, warmup)))
            variants.append((f"pipeline {api}", _bind(_pipeline, url, api, n, warmup)))
            variants.append((f"bare1 {api}", _bind(_bare, url, api, n_one, warmup, 1)))
            variants.append((f"pipeline1 {api}", _bind(_pipeline, url, api, n_one, warmup, 1)))
            variants.append((f"gated {api}", _bind(_gated, url, api, n_gate, True)))
            variants.append((f"gated plain {api}", _bind(_gated, url, api, n_gate, False)))

        async def reset(_: int) -> None:
            await server_reset(url)

        results = await run_interleaved(variants, reps, on_round=reset)

    for api in APIS:
        bare, mine = results[f"bare {api}"], results[f"pipeline {api}"]
        gated, plain = results[f"gated {api}"], results[f"gated plain {api}"]
        one_bare, one_mine = results[f"bare1 {api}"], results[f"pipeline1 {api}"]
        label = "Chat Completions" if api == "chat" else "Responses API"
        bare_ttft, mine_ttft = column(bare, "ttft_p50_ms"), column(mine, "ttft_p50_ms")
        section.add(Figure(f"{label}: bare SDK, TTFT p50", "ms", bare_ttft))
        section.add(Figure(f"{label}: pipeline, TTFT p50", "ms", mine_ttft))
        section.add(
            Figure(
                f"{label}: TTFT added by llmtrail (p50, paired by round)",
                "ms",
                [m - b for m, b in zip(mine_ttft, bare_ttft, strict=True)],
                target=Target("<=", 1.0, label="<= 1 ms"),
            )
        )
        one_bare_ttft = column(one_bare, "ttft_p50_ms")
        section.add(
            Figure(
                f"{label}: TTFT added by llmtrail at concurrency 1 (p50, paired by round)",
                "ms",
                [
                    m - b
                    for m, b in zip(column(one_mine, "ttft_p50_ms"), one_bare_ttft, strict=True)
                ],
                note=(
                    f"bare SDK p50 {median(one_bare_ttft):.2f} ms; one stream at a time: the "
                    "latency the pipeline adds when the client's CPU is not the limit"
                ),
            )
        )
        bare_rate, rate = column(bare, "calls_per_s"), column(mine, "calls_per_s")
        section.add(Figure(f"{label}: bare SDK, streams/s", "streams/s", bare_rate))
        section.add(
            Figure(
                f"{label}: pipeline, streams/s",
                "streams/s",
                rate,
                baseline="bare SDK",
                ratio_samples=paired_ratios(rate, bare_rate),
                target=Target(">=", 0.85, of="ratio", label=">= 0.85 of bare"),
            )
        )
        section.add(
            Figure(
                f"{label}: streamed, gated, 429s at the server",
                "429s",
                column(gated, "429s"),
                target=Target("==", 0, label="0"),
            )
        )
        section.add(
            Figure(
                f"{label}: streamed, gated, achieved share of the limit",
                "%",
                [s * 100 for s in column(gated, "share")],
                baseline="plain calls",
                ratio_samples=paired_ratios(column(gated, "share"), column(plain, "share")),
                target=Target(">=", 97, label=">= 97%"),
                note=f"{median(column(gated, 'succeeded')):.0f} of {n_gate} streams succeeded",
            )
        )
        section.add(
            Figure(
                f"{label}: plain calls, gated, achieved share of the limit",
                "%",
                [s * 100 for s in column(plain, "share")],
                note=f"the same gate and server; 429s: {median(column(plain, '429s')):.0f}",
            )
        )
    return section.to_dict()

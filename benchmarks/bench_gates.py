"""Gate efficiency: how much of a rate limit the pipeline uses, and how many 429s it causes.

The server enforces exactly the limits the pipeline is configured with, over a 1 s sliding
window. Two cases: RPM-bound (1,200 RPM: 20 requests per window) and TPM-bound (180,000 TPM:
3,000 tokens per window, about 20 calls). Each is compared with the naive approach: the bare
SDK with its default retries (max_retries=2), 50 at a time, firing at will and retrying 429s.

Invariants:
- Every call of a run is submitted at once; 50 are in flight at most (the pipeline's
  semaphore, the naive client's ``asyncio.Semaphore(50)``).
- 429s are counted by the server (its request log), not by the client.
- The achieved share is measured from the server's arrival times of the requests it counted:
  the time a perfect pacer would need from the first to the last of those arrivals (same
  amounts, same order, each sent the instant it fits the window) divided by the time they
  really took. A perfect pacer scores exactly 100 %; 429s and their retries cost time and
  lower it.
- The server's log, window and config are reset before every run.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._harness import (
    API_KEY,
    MODEL,
    column,
    mock_server,
    pick,
    prompt,
    run_interleaved,
    server_log,
    server_reset,
)
from ._report import Figure, Section, Target, median, paired_ratios

CONCURRENCY = 50
WINDOW_S = 1.0
RPM = 1_200
TPM = 180_000
MAX_OUTPUT_TOKENS = 100


async def _configure(url: str, **config: Any) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/_mock/config", json=config) as r,
    ):
        r.raise_for_status()
    await server_reset(url)


def _charge(record: dict[str, Any]) -> int:
    """Tokens the server charged this request: input + max_output_tokens (module docstring
    of the mock server)."""
    return int(record["input_tokens"]) + MAX_OUTPUT_TOKENS


def ideal_span(amounts: list[int], capacity: int, window_s: float) -> float:
    """Seconds from first to last arrival for a perfect pacer sending ``amounts`` in order.

    Each arrival occupies ``amount`` of the window for ``window_s`` from its arrival (the
    server's rule); the pacer sends each one at the earliest instant it fits.
    """
    held: deque[tuple[float, int]] = deque()
    used = 0
    t = 0.0
    for amount in amounts:
        while held and (used + amount > capacity or held[0][0] + window_s <= t):
            start, freed = held.popleft()
            used -= freed
            t = max(t, start + window_s)
        held.append((t, amount))
        used += amount
    return t


def _achieved(records: list[dict[str, Any]], kind: str) -> dict[str, float]:
    counted = sorted(
        (r for r in records if r["counted"]), key=lambda r: float(r["arrival_monotonic"])
    )
    limited = sum(1 for r in records if r["status"] == 429)
    if kind == "rpm":
        capacity = math.floor(RPM * WINDOW_S / 60)
        amounts = [1] * len(counted)
    else:
        capacity = math.floor(TPM * WINDOW_S / 60)
        amounts = [_charge(r) for r in counted]
    share = math.nan
    if len(counted) >= 2:
        span = float(counted[-1]["arrival_monotonic"]) - float(counted[0]["arrival_monotonic"])
        ideal = ideal_span(amounts, capacity, WINDOW_S)
        if span > 0 and ideal > 0:
            share = ideal / span
    return {"share": share, "429s": float(limited), "arrivals": float(len(records))}


async def _pipeline(url: str, n: int, kind: str) -> dict[str, float]:
    from llmtrail.pipeline import BaseLLMService, GenerationRequest

    service = BaseLLMService(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key=API_KEY,
        max_rpm=RPM if kind == "rpm" else None,
        max_tpm=TPM if kind == "tpm" else None,
        rpm_window_seconds=WINDOW_S,
        max_concurrent_requests=CONCURRENCY,
        store_url=None,
        tracing=False,
    )
    async with service:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(
                service.execute_generation_async(
                    GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS),
                    operation_name="bench",
                )
                for i in range(n)
            )
        )
        elapsed = loop.time() - started
    figures = _achieved(await server_log(url), kind)
    figures["succeeded"] = float(sum(r.success for r in results))
    figures["elapsed_s"] = elapsed
    return figures


async def _naive(url: str, n: int, kind: str) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY)  # default retries
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int) -> bool:
        async with semaphore:
            try:
                await client.responses.create(
                    model=MODEL, input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS
                )
            except openai.APIError:
                return False
            return True

    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok = await asyncio.gather(*(call(i) for i in range(n)))
        elapsed = loop.time() - started
    finally:
        await client.close()
    figures = _achieved(await server_log(url), kind)
    figures["succeeded"] = float(sum(ok))
    figures["elapsed_s"] = elapsed
    return figures


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 5, 3, 2)
    n_rpm = pick(quick, 400, 60, 30)
    n_tpm = pick(quick, 200, 40, 30)
    section = Section("gates", "2. Gate efficiency")
    section.notes.append(
        f"server and pipeline limits equal, 1 s sliding window; RPM case: {RPM:,} RPM "
        f"({RPM // 60} per window), {n_rpm} calls; TPM case: {TPM:,} TPM ({TPM // 60:,} "
        f"tokens per window, about {MAX_OUTPUT_TOKENS + 30} per call), {n_tpm} calls; "
        f"{CONCURRENCY} in flight at most; {reps} rounds. Naive = bare SDK with default "
        "retries (max_retries=2), Semaphore(50), no gate."
    )
    if quick:
        section.notes.append(
            f"--quick: {n_rpm} calls in the RPM case instead of the issue's 400 (run without "
            "--quick for the figure of record)"
        )
    with mock_server() as (url, _):

        def run(kind: str, naive: bool) -> Callable[[], Awaitable[dict[str, float]]]:
            async def go() -> dict[str, float]:
                limits = {"rpm_limit": RPM, "tpm_limit": None}
                if kind == "tpm":
                    limits = {"rpm_limit": None, "tpm_limit": TPM}
                await _configure(url, window_s=WINDOW_S, **limits)
                n = n_rpm if kind == "rpm" else n_tpm
                return await (_naive(url, n, kind) if naive else _pipeline(url, n, kind))

            return go

        results = await run_interleaved(
            [
                ("pipeline rpm", run("rpm", False)),
                ("naive rpm", run("rpm", True)),
                ("pipeline tpm", run("tpm", False)),
                ("naive tpm", run("tpm", True)),
            ],
            reps,
        )

    for kind, label, n in (("rpm", "RPM-bound", n_rpm), ("tpm", "TPM-bound", n_tpm)):
        mine, naive = results[f"pipeline {kind}"], results[f"naive {kind}"]
        share, naive_share = column(mine, "share"), column(naive, "share")
        section.add(
            Figure(
                f"{label}: pipeline, 429s at the server",
                "429s",
                column(mine, "429s"),
                target=Target("==", 0, label="0"),
            )
        )
        section.add(
            Figure(
                f"{label}: pipeline, achieved share of the limit",
                "%",
                [s * 100 for s in share],
                baseline="naive",
                ratio_samples=paired_ratios(share, naive_share),
                target=Target(">=", 95, label=">= 95%"),
                note=(
                    f"{median(column(mine, 'succeeded')):.0f} of {n} calls succeeded, "
                    f"{median(column(mine, 'elapsed_s')):.1f} s per run"
                ),
            )
        )
        section.add(
            Figure(f"{label}: naive SDK, 429s at the server", "429s", column(naive, "429s"))
        )
        section.add(
            Figure(
                f"{label}: naive SDK, achieved share of the limit",
                "%",
                [s * 100 for s in naive_share],
                note=(
                    f"{median(column(naive, 'succeeded')):.0f} of {n} calls succeeded, "
                    f"{median(column(naive, 'elapsed_s')):.1f} s per run"
                ),
            )
        )
    return section.to_dict()

"""Gate efficiency: how much of a rate limit each client uses, and how many 429s it causes.

The local server enforces exactly the limits every client is configured with, over a sliding
window, and answers after a fixed latency. Cases (window, latency): 1 s / 0 ms, 1 s / 200 ms,
20 s / 4 s, and OpenAI's 60 s / 10 s scaled down four times (15 s / 2.5 s) so that a run stays
under two minutes. Each case is RPM-bound and TPM-bound in turn (the other limit off).

Clients (peers run when installed: ``pip install -e ".[benchmarks]"``; LiteLLM separately):
- ``llmtrail``: the pipeline, ``arrival_guard_s`` = :data:`GUARD_S` (loopback, see the notes);
- ``bare SDK``: ``openai.AsyncOpenAI`` with its own retries (``max_retries=2``), no gate;
- ``SDK + aiolimiter`` / ``SDK + pyrate-limiter``: the SDK behind a limiter of the same
  capacity per window (TPM: each call acquires its estimate, input + max_output_tokens);
- ``LiteLLM Router``: one deployment with ``rpm`` / ``tpm`` set to the limits, its retries on.
Peers run only in the 1 s cases: on the long windows each run lasts minutes.

First, the assumption itself: 2,000 requests through the provider's send-time hook, and for
each the server's arrival time minus the hook's body-sent reading (one monotonic clock: the
server is a child process on this machine). ``arrival_guard_s`` must cover its maximum.

Invariants:
- Every call of a run is submitted at once; 50 are in flight at most.
- 429s and arrivals are counted by the server (its request log), not by the client; failed
  calls are the client's calls that did not succeed in the end.
- The achieved share is measured from the server's arrival times of the requests it counted:
  the time a perfect pacer would need from the first to the last of those arrivals (same
  amounts, same order, each sent the instant it fits the window) divided by the time they
  really took. A perfect pacer scores exactly 100 %; 429s and their retries cost time and
  lower it.
- The server's log, window and config are reset before every run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

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
    tiny,
)
from ._report import Figure, Section, Target, median, percentile

_log = structlog.get_logger(__name__)

CONCURRENCY = 50
MAX_OUTPUT_TOKENS = 100
#: The server is on loopback: the one-way delay is microseconds, and what the guard must cover
#: is the server process being scheduled on a shared machine. Real networks: the default, 0.1 s.
GUARD_S = 0.02


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    window_s: float
    latency_s: float
    rpm: int
    tpm: int
    calls_rpm: int
    calls_tpm: int
    target_rpm: float
    target_tpm: float
    peers: bool


def _cases(quick: bool) -> list[Case]:
    # Capacities per window: 20 requests, 3,000 tokens (about 23 calls of ~130 tokens) in the
    # 1 s cases; 40 requests / 5,200 tokens in the long ones (80 calls: two windows' worth).
    return [
        Case("w1_l0", "1 s window, 0 ms", 1.0, 0.0, 1_200, 180_000,
             pick(quick, 200, 60, 30), pick(quick, 200, 60, 30), 99, 97, True),
        Case("w1_l200", "1 s window, 200 ms", 1.0, 0.2, 1_200, 180_000,
             pick(quick, 400, 60, 30), pick(quick, 200, 60, 30), 97, 97, True),
        Case("w20_l4", "20 s window, 4 s", 20.0, 4.0, 120, 15_600,
             pick(quick, 80, 80, 6), pick(quick, 80, 80, 6), 97, 97, False),
        Case("w15_l2.5", "60 s / 10 s scaled 1/4: 15 s window, 2.5 s", 15.0, 2.5, 160, 20_800,
             pick(quick, 80, 80, 6), pick(quick, 80, 80, 6), 98, 98, False),
    ]  # fmt: skip


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


def _estimate(i: int) -> int:
    """What a careful client reserves for call i: the input estimate plus max output."""
    return math.ceil(len(prompt(i)) / 4) + 4 + MAX_OUTPUT_TOKENS


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


def _achieved(records: list[dict[str, Any]], case: Case, kind: str) -> dict[str, float]:
    counted = sorted(
        (r for r in records if r["counted"]), key=lambda r: float(r["arrival_monotonic"])
    )
    limited = sum(1 for r in records if r["status"] == 429)
    limit = case.rpm if kind == "rpm" else case.tpm
    capacity = math.floor(limit * case.window_s / 60 + 1e-9)
    amounts = [1] * len(counted) if kind == "rpm" else [_charge(r) for r in counted]
    share = math.nan
    if len(counted) >= 2:
        span = float(counted[-1]["arrival_monotonic"]) - float(counted[0]["arrival_monotonic"])
        ideal = ideal_span(amounts, capacity, case.window_s)
        if span > 0 and ideal > 0:
            share = ideal / span
    return {"share": share, "429s": float(limited), "arrivals": float(len(records))}


Client = Callable[[str, Case, str, int], Awaitable[int]]  # -> calls that succeeded


async def _llmtrail(url: str, case: Case, kind: str, n: int) -> int:
    from llmtrail.pipeline import BaseLLMService, GenerationRequest

    service = BaseLLMService(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key=API_KEY,
        max_rpm=case.rpm if kind == "rpm" else None,
        max_tpm=case.tpm if kind == "tpm" else None,
        rpm_window_seconds=case.window_s,
        max_concurrent_requests=CONCURRENCY,
        arrival_guard_s=GUARD_S,
        store_url=None,
        tracing=False,
    )
    async with service:
        results = await asyncio.gather(
            *(
                service.execute_generation_async(
                    GenerationRequest(user_prompt=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS),
                    operation_name="bench",
                )
                for i in range(n)
            )
        )
    return sum(r.success for r in results)


def _sdk_with(limiter: str) -> Client:
    async def run(url: str, case: Case, kind: str, n: int) -> int:
        import openai

        limit = case.rpm if kind == "rpm" else case.tpm
        capacity = math.floor(limit * case.window_s / 60 + 1e-9)
        acquire: Callable[[int], Awaitable[Any]] | None = None
        if limiter == "aiolimiter":
            from aiolimiter import AsyncLimiter

            leaky = AsyncLimiter(capacity, case.window_s)
            acquire = leaky.acquire
        elif limiter == "pyrate-limiter":
            from pyrate_limiter import Limiter, Rate

            pyrate = Limiter(Rate(capacity, int(case.window_s * 1000)))

            async def acquire_pyrate(amount: int) -> None:
                await pyrate.try_acquire_async("bench", weight=amount)

            acquire = acquire_pyrate
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY)  # max_retries=2
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def call(i: int) -> bool:
            if acquire is not None:
                await acquire(1 if kind == "rpm" else _estimate(i))
            async with semaphore:
                try:
                    await client.responses.create(
                        model=MODEL, input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS
                    )
                except openai.APIError:
                    return False
                return True

        try:
            return sum(await asyncio.gather(*(call(i) for i in range(n))))
        finally:
            await client.close()

    return run


async def _litellm(url: str, case: Case, kind: str, n: int) -> int:
    # Its bundled price map, not the one it would fetch from the internet at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    limits = {"rpm": case.rpm} if kind == "rpm" else {"tpm": case.tpm}
    router = litellm.Router(
        model_list=[
            {
                "model_name": "bench",
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{url}/v1",
                    "api_key": API_KEY,
                    **limits,
                },
            }
        ],
        num_retries=2,
    )
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def call(i: int) -> bool:
        async with semaphore:
            try:
                await router.aresponses(
                    model="bench", input=prompt(i), max_output_tokens=MAX_OUTPUT_TOKENS
                )
            except Exception:  # every failure LiteLLM raises, whatever its class
                return False
            return True

    return sum(await asyncio.gather(*(call(i) for i in range(n))))


async def _arrival_delays(url: str, n: int) -> list[float]:
    """Seconds from the send-time hook's reading to the server's count, per request (shared
    monotonic clock): what ``arrival_guard_s`` must cover here. Negative: counted first."""
    from llmtrail.pipeline import GenerationRequest, OpenAIResponsesProvider
    from llmtrail.pipeline._send_time import reset_body_sent_callback, set_body_sent_callback

    await _configure(url, window_s=60.0, latency_s=0.0, rpm_limit=None, tpm_limit=None)
    provider = OpenAIResponsesProvider(api_key=API_KEY, base_url=f"{url}/v1")
    loop = asyncio.get_running_loop()
    body_sent: dict[str, float] = {}
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        rid = f"delay-{i}"
        async with semaphore:
            token = set_body_sent_callback(lambda: body_sent.setdefault(rid, loop.time()))
            try:
                await provider.invoke(
                    GenerationRequest(user_prompt=prompt(i)),
                    model=MODEL,
                    timeout_s=30.0,
                    client_request_id=rid,
                )
            finally:
                reset_body_sent_callback(token)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await provider.aclose()
    return [
        float(r["arrival_monotonic"]) - body_sent[r["client_request_id"]]
        for r in await server_log(url)
        if r["client_request_id"] in body_sent
    ]


def _clients() -> tuple[list[tuple[str, Client]], list[str]]:
    """The clients to run, and notes on the peers that are not installed."""
    clients: list[tuple[str, Client]] = [
        ("llmtrail", _llmtrail),
        ("bare SDK", _sdk_with("none")),
    ]
    missing = []
    for name, module in (("aiolimiter", "aiolimiter"), ("pyrate-limiter", "pyrate_limiter")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"SDK + {name} skipped: {name} is not installed")
        else:
            clients.append((f"SDK + {name}", _sdk_with(name)))
    if importlib.util.find_spec("litellm") is None:
        missing.append("LiteLLM Router skipped: litellm is not installed (pip install litellm)")
    else:
        clients.append(("LiteLLM Router", _litellm))
    return clients, missing


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(_main(quick))


async def _main(quick: bool) -> dict[str, Any]:
    reps = pick(quick, 3, 1, 1)
    section = Section("gates", "2. Gate efficiency")
    clients, missing = _clients()
    section.notes.append(
        "The local server enforces the same limits as every client, over a sliding window "
        f"of the case's length; {CONCURRENCY} in flight at most; {MAX_OUTPUT_TOKENS} max "
        "output tokens, ~130 tokens charged per call. Capacities per window: 20 requests / "
        "3,000 tokens (1 s cases), 40 requests / 5,200 tokens (long cases). Share of the limit: "
        "a perfect pacer's span over the real span of the server's counted arrivals. "
        f"llmtrail runs with arrival_guard_s={GUARD_S} (loopback; the default is 0.1 s for "
        "real networks) and grants up to 0.1 s ahead, held at the wire. "
        f"Rounds: {reps} in the 1 s cases, 1 in the long ones (peers only in "
        "the 1 s cases)."
    )
    section.notes.extend(missing)
    results: dict[str, list[dict[str, float]]] = {}
    with mock_server() as (url, _):
        delays = [d * 1000 for d in await _arrival_delays(url, pick(quick, 2_000, 500, 50))]
        for q in (50, 99, 100):
            section.add(
                Figure(
                    f"arrival at the server minus the hook's body-sent reading, p{q}",
                    "ms",
                    [percentile(delays, q)],
                    note=f"{len(delays)} requests, {CONCURRENCY} at a time, zero latency: what "
                    f"arrival_guard_s={GUARD_S} must cover on this machine",
                )
            )
        for case in _cases(quick):
            if tiny() and not case.peers:
                continue
            variants = []
            for kind in ("rpm", "tpm"):
                n = case.calls_rpm if kind == "rpm" else case.calls_tpm
                for name, client in clients if case.peers else clients[:1]:
                    variants.append(
                        (f"{case.key} {kind} {name}", _variant(url, case, kind, n, client))
                    )
            results.update(await run_interleaved(variants, reps if case.peers else 1))
    for case in _cases(quick):
        for kind in ("rpm", "tpm"):
            n = case.calls_rpm if kind == "rpm" else case.calls_tpm
            for name, _ in clients if case.peers else clients[:1]:
                runs = results.get(f"{case.key} {kind} {name}")
                if not runs:
                    continue
                _add(section, case, kind, n, name, runs)
    return section.to_dict()


def _variant(
    url: str, case: Case, kind: str, n: int, client: Client
) -> Callable[[], Awaitable[dict[str, float]]]:
    async def go() -> dict[str, float]:
        limits = {"rpm_limit": case.rpm, "tpm_limit": None}
        if kind == "tpm":
            limits = {"rpm_limit": None, "tpm_limit": case.tpm}
        await _configure(url, window_s=case.window_s, latency_s=case.latency_s, **limits)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            succeeded = await client(url, case, kind, n)
        except Exception as exc:  # a peer that cannot run here: reported, not fatal
            _log.warning("gate bench client failed", case=case.key, kind=kind, error=repr(exc))
            return {
                "error": 1.0,
                "succeeded": 0.0,
                "share": math.nan,
                "429s": math.nan,
                "arrivals": 0.0,
                "elapsed_s": loop.time() - started,
            }
        elapsed = loop.time() - started
        figures = _achieved(await server_log(url), case, kind)
        figures["succeeded"] = float(succeeded)
        figures["elapsed_s"] = elapsed
        return figures

    return go


def _add(
    section: Section, case: Case, kind: str, n: int, name: str, runs: list[dict[str, float]]
) -> None:
    label = f"{case.label}, {kind.upper()}: {name}"
    mine = name == "llmtrail"
    failed = [n - s for s in column(runs, "succeeded")]
    note = (
        f"{median(failed):.0f} of {n} calls failed, {median(column(runs, 'elapsed_s')):.1f} s "
        f"per run, {len(runs)} round(s)"
    )
    if any(r.get("error") for r in runs):
        note = "the client raised: it cannot run against this server (see the module docstring)"
    section.add(
        Figure(
            f"{label}, 429s at the server",
            "429s",
            column(runs, "429s"),
            target=Target("==", 0, label="0") if mine else None,
        )
    )
    section.add(
        Figure(
            f"{label}, share of the limit",
            "%",
            [s * 100 for s in column(runs, "share")],
            target=(
                Target(">=", case.target_rpm if kind == "rpm" else case.target_tpm)
                if mine
                else None
            ),
            note=note,
        )
    )

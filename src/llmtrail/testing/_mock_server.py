"""A local OpenAI-compatible server for tests, the demo and benchmarks (``llmtrail mock-server``).

It serves ``POST /v1/responses`` (JSON and SSE) with aiohttp, plus control endpoints under
``/_mock/`` (``GET /_mock/log``, ``POST /_mock/reset``, ``GET``/``POST /_mock/config``).

Invariants:
- Given the config, the seed and the order of arrivals, everything is deterministic: usage, the
  output text, and the fault and latency jitter drawn for the n-th arrival.
- One arrival decides auth, validation, quota, rate window and fault with no ``await`` in
  between, so two concurrent arrivals can never both take the last slot of a window.
- Every arrival at ``/v1/responses`` gets exactly one log record; its ``status`` is set when an
  HTTP answer is actually sent (``None``: dropped, hung, or the client left before the answer).
- Every HTTP answer carries ``x-request-id`` and the six ``x-ratelimit-*`` headers.

Usage model: see :mod:`llmtrail.testing._mock_responses` (input and output tokens, reasoning, JSON
schemas, ``max_output_tokens``). On top of it the server adds:

- Prompt cache: the prompt text is cut into 128-token (512-character) prefixes from 1024 tokens
  on. ``cached_tokens`` is 128 x the longest such prefix an earlier counted request already
  sent (so an exact repeat of a >= 1024-token prompt gets the largest multiple of 128 <= input).
  ``cache_write_tokens`` is always 0: implicit caching writes are free and reported as 0.

Rate limits: requests and tokens are counted in one sliding window of ``window_s`` seconds whose
capacity is ``limit * window_s / 60``. A request is counted when it arrives, charged
``input_tokens + (max_output_tokens or its real output)``, and stays until ``arrival + window_s``.
Requests answered 429 (by the limits, the quota or the forced-429 fault), 400 or 401 are not
counted; every other answer, faults included, is (the provider saw the request). With
``count_rate_limited=1`` a 429 for the limits counts as a request (no tokens), as OpenAI documents
for failed requests. Every answer carries ``openai-processing-ms`` (arrival to answer). Limits are
global, not per model. ``remaining`` headers are what is left in the current window; ``reset``
headers are the time until the window is empty again. ``retry-after-ms`` on a 429 is the time
until enough of the window has left for that request to fit. ``token_quota`` is a total over the
server's life (until reset): once the tokens served reach it, every request gets 429
``insufficient_quota``; the request that crosses it is still served.

Faults: each arrival draws its fault and its jitter from ``Random(seed)`` (whatever then happens
to it); the first ``len(fault_script)`` arrivals take their fault from the script. A fault applies
only to a request that passed auth, validation, quota and the rate window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self, Union, get_args, get_origin, get_type_hints

from aiohttp import web

# A relative import even when run_in_process starts this file: its bootstrap registers a bare
# `pipeline` package (no __init__, so no openai SDK) for this module and its sibling.
from ._mock_responses import (
    BadRequest,
    Plan,
    error_body,
    new_id,
    plan_request,
    response_body,
    sse,
    stream_head,
    stream_tail,
    usage_of,
)

__all__ = [
    "Fault",
    "LogRecord",
    "MockServer",
    "MockServerConfig",
    "add_arguments",
    "format_duration",
    "max_arrivals_in_window",
    "run_from_args",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
    "serve",
]

UNLIMITED = 1_000_000_000  # the limit reported in headers when no limit is configured
ORGANIZATION = "org-mock"
_RATE_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_CACHE_MIN_TOKENS = 1024
_CACHE_STEP_CHARS = 128 * 4
_CACHE_MAX_ENTRIES = 200_000  # the prefix set is cleared when it grows past this


class Fault(StrEnum):
    """An injected fault, as recorded in the log."""

    HTTP_500 = "http_500"  # 500, type server_error
    HTTP_503 = "http_503"  # 503, type server_error
    RATE_LIMIT_429 = "rate_limit_429"  # 429 rate_limit_exceeded with retry-after, not counted
    # A normal answer after slow_s instead of the latency; a stream stalls after in_progress.
    SLOW = "slow"
    HANG = "hang"  # never answers; the handler waits until the client goes away
    DROP = "drop"  # the socket is closed without any response
    MALFORMED_JSON = "malformed_json"  # 200 with a truncated JSON body (or SSE event)
    MISSING_USAGE = "missing_usage"  # 200 with a valid response whose usage is null


_FAULT_RATE_FIELDS: tuple[tuple[str, Fault], ...] = (
    ("fault_500_rate", Fault.HTTP_500),
    ("fault_503_rate", Fault.HTTP_503),
    ("fault_429_rate", Fault.RATE_LIMIT_429),
    ("fault_slow_rate", Fault.SLOW),
    ("fault_hang_rate", Fault.HANG),
    ("fault_drop_rate", Fault.DROP),
    ("fault_malformed_rate", Fault.MALFORMED_JSON),
    ("fault_no_usage_rate", Fault.MISSING_USAGE),
)


def _opt(help_: str) -> Any:
    return {"help": help_}


@dataclass(frozen=True)
class MockServerConfig:
    """The server's behaviour. Invalid values raise ValueError naming the field."""

    latency_s: float = field(default=0.0, metadata=_opt("fixed latency of every answer"))
    latency_jitter_s: float = field(default=0.0, metadata=_opt("extra seeded uniform jitter"))
    latency_sigma: float = field(
        default=0.0, metadata=_opt("lognormal spread: latency_s x exp(sigma x z), seeded")
    )
    output_tokens_min: int = field(default=20, metadata=_opt("smallest planned output"))
    output_tokens_max: int = field(default=60, metadata=_opt("largest planned output"))
    rpm_limit: int | None = field(default=None, metadata=_opt("requests per minute"))
    tpm_limit: int | None = field(default=None, metadata=_opt("tokens per minute"))
    window_s: float = field(default=60.0, metadata=_opt("sliding window length, seconds"))
    token_quota: int | None = field(default=None, metadata=_opt("total tokens before 429 quota"))
    require_api_key: str | None = field(default=None, metadata=_opt("401 unless this bearer"))
    seed: int = field(default=0, metadata=_opt("seed of faults and jitter"))
    fault_500_rate: float = field(default=0.0, metadata=_opt("share of 500 answers"))
    fault_503_rate: float = field(default=0.0, metadata=_opt("share of 503 answers"))
    fault_429_rate: float = field(default=0.0, metadata=_opt("share of forced 429 answers"))
    fault_slow_rate: float = field(default=0.0, metadata=_opt("share answered after slow_s"))
    fault_hang_rate: float = field(default=0.0, metadata=_opt("share never answered"))
    fault_drop_rate: float = field(default=0.0, metadata=_opt("share of dropped connections"))
    fault_malformed_rate: float = field(default=0.0, metadata=_opt("share of invalid JSON"))
    fault_no_usage_rate: float = field(default=0.0, metadata=_opt("share without usage"))
    fault_script: tuple[str, ...] = field(
        default=(),
        metadata=_opt("faults of the first arrivals, comma separated ('none' for no fault)"),
    )
    slow_s: float = field(default=120.0, metadata=_opt("delay of the slow fault"))
    fault_429_retry_after_s: float = field(default=0.1, metadata=_opt("retry-after of forced 429"))
    count_rate_limited: int = field(
        default=0, metadata=_opt("1: a rate-limit 429 still counts as a request in the window")
    )
    stream_chunks: int = field(default=4, metadata=_opt("output_text.delta events per stream"))
    log_max_records: int = field(default=1_000_000, metadata=_opt("older records are dropped"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fault_script":
                continue
            optional = value is None and "None" in str(f.type)
            if f.name == "require_api_key":
                ok = optional or (isinstance(value, str) and value != "")
                _check(f.name, ok, f"={value!r}: use a non-empty string, or None for no check")
            elif isinstance(value, bool):
                _check(f.name, False, f"={value!r}: expected a number, not a bool")
            elif str(f.type).startswith("int"):
                _check(f.name, optional or isinstance(value, int), f"={value!r}: expected an int")
            else:
                ok = isinstance(value, int | float) and math.isfinite(value)
                _check(f.name, ok, f"={value!r}: expected a finite number")
        _check("count_rate_limited", self.count_rate_limited in (0, 1), "must be 0 or 1")
        for name in (
            "latency_s",
            "latency_jitter_s",
            "latency_sigma",
            "slow_s",
            "fault_429_retry_after_s",
        ):
            _check(name, getattr(self, name) >= 0, "must be >= 0")
        _check("output_tokens_min", self.output_tokens_min >= 1, "must be >= 1")
        _check(
            "output_tokens_max",
            self.output_tokens_max >= self.output_tokens_min,
            f"must be >= output_tokens_min ({self.output_tokens_min})",
        )
        _check("window_s", self.window_s > 0, "must be > 0")
        for name in ("rpm_limit", "tpm_limit"):
            limit = getattr(self, name)
            _check(
                name,
                limit is None or limit * self.window_s / 60 >= 1,
                f"with window_s={self.window_s} must allow at least one per window "
                "(limit * window_s / 60 >= 1); raise it or lengthen window_s",
            )
        _check("token_quota", self.token_quota is None or self.token_quota >= 0, "must be >= 0")
        _check("stream_chunks", self.stream_chunks >= 1, "must be >= 1")
        _check("log_max_records", self.log_max_records >= 1, "must be >= 1")
        for name, _ in _FAULT_RATE_FIELDS:
            _check(name, 0 <= getattr(self, name) <= 1, "must be within [0, 1]")
        total = sum(getattr(self, name) for name, _ in _FAULT_RATE_FIELDS)
        _check("fault_500_rate", total <= 1, f"the fault rates sum to {total}, more than 1")
        script = self.fault_script
        ok = not isinstance(script, str) and all(isinstance(item, str) for item in script)
        _check("fault_script", ok, f"={script!r}: expected a sequence of fault names")
        allowed = {f.value for f in Fault} | {"none", ""}
        for item in script:
            _check(
                "fault_script", item in allowed, f"unknown fault {item!r}; use {sorted(allowed)}"
            )
        object.__setattr__(self, "fault_script", tuple(script))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fault_script"] = list(self.fault_script)
        return data


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        separator = "" if problem.startswith("=") else " "
        raise ValueError(f"MockServerConfig.{name}{separator}{problem}")


@dataclass(slots=True)
class LogRecord:
    """One arrival at /v1/responses. ``status`` None means no HTTP answer was sent."""

    index: int
    arrival_monotonic: float
    arrival_wall: float
    request_id: str
    client_request_id: str | None
    authorization_present: bool
    model: str | None = None
    stream: bool = False
    status: int | None = None
    fault: str | None = None
    error_type: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    counted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------- rate window and prompt cache


def _ceil_ms(seconds: float) -> int:
    # The tolerance keeps float noise (1000.0 + 1 - 1000.9 = 0.10000000000002) from adding 1 ms.
    return max(math.ceil(seconds * 1000 - 1e-6), 0)


def format_duration(seconds: float) -> str:
    """OpenAI's header format: "20ms", "1s", "1.5s", "6m0s", "1h2m3s" (rounded up to a ms)."""
    ms = _ceil_ms(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _Window:
    """Counted arrivals ``(t, tokens)`` in arrival order; an entry leaves at ``t + window_s``."""

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def purge(self, now: float, window_s: float) -> None:
        entries = self.entries
        while entries and entries[0][0] + window_s <= now:
            self.tokens -= entries.popleft()[1]

    def wait_for(self, now: float, window_s: float, requests: int, tokens: int) -> float:
        """Seconds until ``requests`` more entries and ``tokens`` more tokens have left."""
        until = 0.0
        freed_tokens = 0
        for freed_requests, (t, cost) in enumerate(self.entries):
            if freed_requests >= requests and freed_tokens >= tokens:
                break
            freed_tokens += cost
            until = t + window_s - now
        return max(until, 0.0)


class _PrefixCache:
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def lookup_and_add(self, prompt: str) -> int:
        steps = len(prompt) // _CACHE_STEP_CHARS
        if math.ceil(len(prompt) / 4) < _CACHE_MIN_TOKENS or steps * 128 < _CACHE_MIN_TOKENS:
            return 0
        if len(self.seen) > _CACHE_MAX_ENTRIES:
            self.seen.clear()
        hasher = hashlib.sha1(usedforsecurity=False)
        cached = 0
        for k in range(1, steps + 1):
            hasher.update(prompt[(k - 1) * _CACHE_STEP_CHARS : k * _CACHE_STEP_CHARS].encode())
            if k * 128 < _CACHE_MIN_TOKENS:
                continue
            digest = hasher.copy().digest()
            if digest in self.seen:
                cached = k * 128
            else:
                self.seen.add(digest)
        return cached


def max_arrivals_in_window(arrival_times: Iterable[float], window_s: float) -> int:
    """The most arrivals in any half-open window ``[t, t + window_s)``.

    Also usable on the ``arrival_monotonic`` values of ``GET /_mock/log`` from a child process.
    """
    times = sorted(arrival_times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# ---------------------------------------------------------------- the server


class MockServer:
    """The local OpenAI-compatible server. ``async with MockServer(config) as server: server.url``.

    ``clock`` (monotonic seconds) drives the rate window, arrival times and retry-after; tests
    pass a fake clock to move the window without sleeping. Latency always sleeps for real.
    """

    def __init__(
        self, config: MockServerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config if config is not None else MockServerConfig()
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()
        self._log: deque[LogRecord] = deque(maxlen=self._config.log_max_records)
        self._arrival_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.reset()

    # -- public API

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); the SDK's base_url is ``url + "/v1"``."""
        if self._url is None:
            raise RuntimeError("MockServer is not running: call `await server.start()` first")
        return self._url

    @property
    def config(self) -> MockServerConfig:
        return self._config

    @property
    def log(self) -> list[LogRecord]:
        """A snapshot of the request log, oldest first (live records: statuses may still change)."""
        return list(self._log)

    def reset(self) -> None:
        """Clear the log, the rate window, the quota used and the prompt cache; reseed faults."""
        self._log = deque(maxlen=self._config.log_max_records)
        self._window = _Window()
        self._cache = _PrefixCache()
        self._quota_used = 0
        self._next_index = 0
        self._rng = random.Random(self._config.seed)

    def update_config(self, **changes: Any) -> MockServerConfig:
        """Change the config at runtime (validated). A new seed restarts the fault sequence."""
        names = {f.name for f in dataclasses.fields(MockServerConfig)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown MockServerConfig field(s) {unknown}; known: {sorted(names)}")
        new = dataclasses.replace(self._config, **changes)
        old, self._config = self._config, new
        if new.seed != old.seed:
            self._rng = random.Random(new.seed)
        if new.log_max_records != old.log_max_records:
            self._log = deque(self._log, maxlen=new.log_max_records)
        return new

    async def wait_for_arrivals(self, count: int) -> None:
        """Return once ``count`` arrivals reached /v1/responses since the last reset.

        For tests that must act while a request is at the server (cancel it, stop the server)
        without sleeping; bound it with ``asyncio.timeout``.
        """
        if self._next_index >= count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._arrival_waiters.append((count, waiter))
        try:
            await waiter
        finally:
            self._arrival_waiters = [(n, w) for n, w in self._arrival_waiters if w is not waiter]

    def arrivals_in_any_window(self, window_s: float, *, counted_only: bool = False) -> int:
        """The most arrivals in any window ``[t, t + window_s)``, from the log."""
        return max_arrivals_in_window(
            [r.arrival_monotonic for r in self._log if r.counted or not counted_only], window_s
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError(f"MockServer is already running at {self._url}")
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/responses", self._handle_responses)
        app.router.add_get("/_mock/log", self._handle_log)
        app.router.add_post("/_mock/reset", self._handle_reset)
        app.router.add_get("/_mock/config", self._handle_config)
        app.router.add_post("/_mock/config", self._handle_config)
        app.on_response_prepare.append(self._on_prepare)
        # handler_cancellation: a hung or slow handler ends when its client goes away.
        # shutdown_timeout is short because stop() wakes every waiting handler first.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        url_host = f"[{url_host}]" if ":" in url_host else url_host
        self._url = f"http://{url_host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop listening; hung and sleeping handlers drop their connections."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals

    def _capacities(self) -> tuple[int, int]:
        scale = self._config.window_s / 60
        rpm = self._config.rpm_limit or UNLIMITED
        tpm = self._config.tpm_limit or UNLIMITED
        # The epsilon keeps 240 * 1 / 60 from flooring to 3 through float error.
        return math.floor(rpm * scale + 1e-9), math.floor(tpm * scale + 1e-9)

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if "x-request-id" not in headers:
            headers["x-request-id"] = new_id("req_", 16)
        config, window, now = self._config, self._window, self._clock()
        window.purge(now, config.window_s)
        cap_requests, cap_tokens = self._capacities()
        reset = (
            format_duration(window.entries[-1][0] + config.window_s - now)
            if window.entries
            else "0s"
        )
        headers["x-ratelimit-limit-requests"] = str(config.rpm_limit or UNLIMITED)
        headers["x-ratelimit-limit-tokens"] = str(config.tpm_limit or UNLIMITED)
        headers["x-ratelimit-remaining-requests"] = str(max(cap_requests - len(window.entries), 0))
        headers["x-ratelimit-remaining-tokens"] = str(max(cap_tokens - window.tokens, 0))
        headers["x-ratelimit-reset-requests"] = reset
        headers["x-ratelimit-reset-tokens"] = reset
        headers["openai-organization"] = ORGANIZATION
        headers["openai-version"] = "2020-10-01"

    def _answer(
        self, record: LogRecord, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        record.status = status
        # As OpenAI does: the time the server spent on the request, arrival to answer.
        processing_ms = max(round((self._clock() - record.arrival_monotonic) * 1000), 0)
        return web.Response(
            status=status,
            body=body,
            content_type="application/json",
            headers={
                "x-request-id": record.request_id,
                "openai-processing-ms": str(processing_ms),
                **(headers or {}),
            },
        )

    def _error(
        self,
        record: LogRecord,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        record.error_type = type_
        return self._answer(record, status, error_body(message, type_, code, param), headers)

    def _rate_limited(
        self, record: LogRecord, kind: str, used: int, requested: int, wait_s: float
    ) -> web.Response:
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        limit = (
            self._config.rpm_limit if kind == "requests" else self._config.tpm_limit
        ) or UNLIMITED
        message = (
            f"Rate limit reached for {record.model} in organization {ORGANIZATION} on {unit}: "
            f"Limit {limit}, Used {used}, Requested {requested}. "
            f"Please try again in {format_duration(wait_s)}. {_RATE_DOCS}"
        )
        wait_ms = max(_ceil_ms(wait_s), 1)
        headers = {"retry-after-ms": str(wait_ms), "retry-after": str(math.ceil(wait_ms / 1000))}
        return self._error(record, 429, message, kind, "rate_limit_exceeded", None, headers)

    def _latency(self, draw: float) -> float:
        """The answer's delay for the uniform ``draw``: fixed + lognormal spread + jitter."""
        config = self._config
        delay = config.latency_s
        if config.latency_sigma > 0:
            z = statistics.NormalDist().inv_cdf(min(max(draw, 1e-12), 1 - 1e-12))
            delay *= math.exp(config.latency_sigma * z)
        return delay + draw * config.latency_jitter_s

    def _pick_fault(self, index: int, draw: float) -> Fault | None:
        script = self._config.fault_script
        if index < len(script):
            return Fault(script[index]) if script[index] not in ("", "none") else None
        for name, fault in _FAULT_RATE_FIELDS:
            rate = getattr(self._config, name)
            if draw < rate:
                return fault
            draw -= rate
        return None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return False at once when the server is stopping."""
        if self._closing.is_set():
            return False
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return True
        return False

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        # Aborting the transport closes the socket at once; aiohttp then discards the
        # response returned here, so the client sees a connection closed without an answer.
        if request.transport is not None:
            request.transport.abort()
        return web.Response()

    async def _handle_responses(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        config, now = self._config, self._clock()
        index, self._next_index = self._next_index, self._next_index + 1
        # Two draws for every arrival, whatever happens to it, so the n-th arrival's fault
        # and jitter depend only on the seed and n.
        fault_draw, jitter_draw = self._rng.random(), self._rng.random()
        authorization = request.headers.get("Authorization")
        record = LogRecord(
            index=index,
            arrival_monotonic=now,
            arrival_wall=time.time(),
            request_id=new_id("req_", 16),
            client_request_id=request.headers.get("x-client-request-id"),
            authorization_present=authorization is not None,
        )
        self._log.append(record)
        for count, waiter in self._arrival_waiters:
            if count <= self._next_index and not waiter.done():
                waiter.set_result(None)
        if (
            config.require_api_key is not None
            and authorization != f"Bearer {config.require_api_key}"
        ):
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                if authorization is None
                else "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            code = None if authorization is None else "invalid_api_key"
            return self._error(record, 401, message, "invalid_request_error", code)
        try:
            body = json.loads(raw)
            plan = plan_request(
                body,
                output_tokens_min=config.output_tokens_min,
                output_tokens_max=config.output_tokens_max,
            )
        except BadRequest as exc:
            return self._error(
                record, 400, exc.message, "invalid_request_error", exc.code, exc.param
            )
        except ValueError:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)"
            )
            return self._error(record, 400, message, "invalid_request_error", None)
        record.model, record.stream, record.input_tokens = (
            plan.model,
            plan.stream,
            plan.input_tokens,
        )

        if config.token_quota is not None and self._quota_used >= config.token_quota:
            return self._error(
                record, 429, _QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"
            )
        window = self._window
        window.purge(now, config.window_s)
        cap_requests, cap_tokens = self._capacities()
        if config.tpm_limit is not None and plan.charge > cap_tokens:
            message = (
                f"Request too large for {plan.model} in organization {ORGANIZATION} on tokens "
                f"per min (TPM): Limit {config.tpm_limit}, Requested {plan.charge}. The input or "
                f"output tokens must be reduced in order to run successfully. {_RATE_DOCS}"
            )
            return self._error(record, 429, message, "tokens", "rate_limit_exceeded")
        need_requests = len(window.entries) + 1 - cap_requests if config.rpm_limit else 0
        need_tokens = window.tokens + plan.charge - cap_tokens if config.tpm_limit else 0
        if need_requests > 0 or need_tokens > 0:
            wait = window.wait_for(now, config.window_s, max(need_requests, 0), max(need_tokens, 0))
            if config.count_rate_limited:  # as OpenAI documents: failed requests count too
                window.entries.append((now, 0))
            if need_requests > 0:
                return self._rate_limited(record, "requests", len(window.entries), 1, wait)
            return self._rate_limited(record, "tokens", window.tokens, plan.charge, wait)

        fault = self._pick_fault(index, fault_draw)
        record.fault = fault.value if fault is not None else None
        if fault is Fault.RATE_LIMIT_429:
            limit = config.rpm_limit or UNLIMITED
            return self._rate_limited(record, "requests", limit, 1, config.fault_429_retry_after_s)
        window.entries.append((now, plan.charge))
        window.tokens += plan.charge
        record.counted = True
        if fault is Fault.DROP:
            return self._drop(request)
        if fault is Fault.HANG:
            await self._closing.wait()
            return self._drop(request)
        if fault in (Fault.HTTP_500, Fault.HTTP_503):
            delay = self._latency(jitter_draw)
            if delay > 0 and not await self._sleep(delay):
                return self._drop(request)
            if fault is Fault.HTTP_500:
                message = "The server had an error while processing your request. Sorry about that!"
                return self._error(record, 500, message, "server_error", None)
            message = "The server is overloaded or not ready yet."
            return self._error(record, 503, message, "server_error", None)

        # Served: bill it, consult the prompt cache, then answer (after latency or slow_s).
        cached = self._cache.lookup_and_add(plan.prompt)
        self._quota_used += plan.input_tokens + plan.output_tokens
        record.cached_tokens, record.output_tokens = cached, plan.output_tokens
        record.reasoning_tokens = plan.reasoning_tokens
        delay = config.slow_s if fault is Fault.SLOW else self._latency(jitter_draw)
        usage = None if fault is Fault.MISSING_USAGE else usage_of(plan, cached)
        if plan.stream:
            return await self._stream(request, record, plan, body, usage, fault, delay)
        if delay > 0 and not await self._sleep(delay):
            return self._drop(request)
        status = "incomplete" if plan.incomplete else "completed"
        ids = (new_id("resp_"), new_id("msg_"))
        answer = response_body(plan, body, ids, int(time.time()), status, usage)
        payload = json.dumps(answer).encode()
        if fault is Fault.MALFORMED_JSON:
            payload = payload[: len(payload) // 2]
        return self._answer(record, 200, payload)

    async def _stream(
        self,
        request: web.Request,
        record: LogRecord,
        plan: Plan,
        body: Mapping[str, Any],
        usage: dict[str, Any] | None,
        fault: Fault | None,
        delay: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "x-request-id": record.request_id,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        await response.prepare(request)
        record.status = 200
        ids, created_at = (new_id("resp_"), new_id("msg_")), int(time.time())
        head = stream_head(plan, body, ids, created_at)
        await response.write(sse(head, 0))
        if delay > 0 and not await self._sleep(delay):
            self._drop(request)
            return response
        if fault is Fault.MALFORMED_JSON:
            await response.write(b'event: response.output_text.delta\ndata: {"type": "resp\n\n')
            await response.write_eof()
            return response
        status = "incomplete" if plan.incomplete else "completed"
        events = stream_tail(plan, body, ids, created_at, status, usage, self._config.stream_chunks)
        await response.write(sse(events, len(head)))
        await response.write_eof()
        return response

    async def _handle_log(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            message = f"since={request.query['since']!r}: expected an arrival index (integer)"
            body = error_body(message, "invalid_request_error", None, "since")
            return web.Response(status=400, body=body, content_type="application/json")
        records = [r.to_dict() for r in self._log if r.index >= since]
        return web.json_response({"records": records})

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _handle_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of MockServerConfig fields")
                self.update_config(**changes)
            except (ValueError, TypeError) as exc:
                body = error_body(str(exc), "invalid_request_error", None)
                return web.Response(status=400, body=body, content_type="application/json")
        return web.json_response(self._config.to_dict())


# ---------------------------------------------------------------- CLI and child process


def serve(
    config: MockServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the server until Ctrl-C or SIGTERM (blocking). ``on_ready`` receives the URL."""

    async def main() -> None:
        server = MockServer(config)
        url = await server.start(host, port)
        stopping = asyncio.Event()
        # Explicit handlers also work where SIGINT is ignored (a background job of a script).
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
        if on_ready is not None:
            on_ready(url)
        try:
            await stopping.wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _field_parser(name: str) -> tuple[Callable[[str], Any], str]:
    hint = get_type_hints(MockServerConfig)[name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is tuple:
        return (lambda text: tuple(s.strip() for s in text.split(",") if s.strip())), "A,B"
    return hint, hint.__name__.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one option per MockServerConfig field."""
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    for f in dataclasses.fields(MockServerConfig):
        parse, metavar = _field_parser(f.name)
        default = "none" if f.default is None else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse,
            default=None,
            metavar=metavar,
            help=f"{f.metadata.get('help', '')} (default {default})",
        )


def run_from_args(args: argparse.Namespace) -> int:
    """``llmtrail mock-server``: print the URL, serve until Ctrl-C; 0 on a clean stop."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(MockServerConfig)
        if getattr(args, f.name, None) is not None
    }
    try:
        config = MockServerConfig(**given)
    except ValueError as exc:
        print(f"llmtrail mock-server: {exc}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(url, flush=True)
        print(f"llmtrail mock-server: POST {url}/v1/responses; Ctrl-C to stop", file=sys.stderr)

    try:
        serve(config, args.host, args.port, on_ready=ready)
    except OSError as exc:
        print(
            f"llmtrail mock-server: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _config_argv(config: MockServerConfig) -> list[str]:
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or value == f.default:
            continue
        text = ",".join(value) if isinstance(value, tuple) else repr(value)
        argv += ["--" + f.name.replace("_", "-"), text.strip("'")]
    return argv


def run_in_process(
    config: MockServerConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 30.0,
) -> tuple[str, Callable[[], None]]:
    """Start ``python -m llmtrail.testing._mock_server`` in a child process: ``(url, stop)``.

    A benchmark's client then does not share a core with the server. ``stop()`` sends SIGTERM
    and waits (SIGKILL after 10 s); it is idempotent.
    """
    # `python -m llmtrail.testing._mock_server`: importing `llmtrail` and `llmtrail.testing`
    # is light (the OpenAI SDK is imported only when the request path is used), so the child
    # starts in well under a second.
    argv = [
        sys.executable,
        "-m",
        "llmtrail.testing._mock_server",
        "--host",
        host,
        "--port",
        str(port),
    ]
    argv += _config_argv(config or MockServerConfig())
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], startup_timeout_s)
    url = proc.stdout.readline().strip() if readable else ""
    if not url.startswith("http"):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(
            f"the mock server child process reported no URL within {startup_timeout_s}s "
            f"(exit code {proc.returncode}); run `python -m llmtrail.testing._mock_server "
            f"{' '.join(argv[3:])}` to see why"
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    return url, stop


@contextlib.contextmanager
def running_in_process(config: MockServerConfig | None = None, **kwargs: Any) -> Iterator[str]:
    """``with running_in_process(config) as url:`` a server in a child process."""
    url, stop = run_in_process(config, **kwargs)
    try:
        yield url
    finally:
        stop()


@contextlib.contextmanager
def running_in_thread(
    config: MockServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[MockServer]:
    """``with running_in_thread(config) as server:`` a server on its own loop in a thread.

    For synchronous tests that also want ``server.log`` in process. Read the log from the
    test thread only after the calls under test have returned.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="llmtrail-mock-server", daemon=True)
    thread.start()
    server = MockServer(config)
    try:
        asyncio.run_coroutine_threadsafe(server.start(host, port), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmtrail.testing._mock_server",
        description="A local OpenAI-compatible server (POST /v1/responses).",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_main())

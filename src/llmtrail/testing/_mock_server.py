"""A local OpenAI-compatible server for tests, the demo and benchmarks (``llmtrail mock-server``).

It serves ``POST /v1/responses`` and ``POST /v1/chat/completions`` (each JSON and SSE) with
aiohttp, plus control endpoints under ``/_mock/`` (``GET /_mock/log``, ``POST /_mock/reset``,
``GET``/``POST /_mock/config``). Both APIs share one log, rate window, prompt cache, quota and
fault sequence, and answer the same conversation with the same text and usage (a Chat
Completions stream sends its usage chunk only when ``stream_options.include_usage`` is set).

Invariants:
- Given the config, the seed and the order of arrivals, everything is deterministic: usage, the
  output text, and the fault and latency jitter drawn for the n-th arrival.
- One arrival decides auth, validation, quota, rate window and fault with no ``await`` in
  between, so two concurrent arrivals can never both take the last slot of a window.
- Every arrival at either API gets exactly one log record; its ``status`` is set when an
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

import asyncio
import dataclasses
import json
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Self

from aiohttp import web

from ._mock_config import (
    _FAULT_RATE_FIELDS,
    _QUOTA_MESSAGE,
    _RATE_DOCS,
    ORGANIZATION,
    UNLIMITED,
    Fault,
    LogRecord,
    MockServerConfig,
    _ceil_ms,
    _PrefixCache,
    _Window,
    format_duration,
    max_arrivals_in_window,
)
from ._mock_responses import (
    BadRequest,
    Plan,
    chat_as_responses,
    chat_body,
    chat_chunks,
    chat_usage,
    error_body,
    is_text_delta,
    new_id,
    plan_request,
    response_body,
    sse,
    sse_data,
    stream_head,
    stream_tail,
    usage_of,
)

__all__ = [
    "Fault",
    "LogRecord",
    "MockServer",
    "MockServerConfig",
    "format_duration",
    "max_arrivals_in_window",
    "add_arguments",
    "run_from_args",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
    "serve",
]

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
        app.router.add_post("/v1/chat/completions", self._handle_chat)
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
        return await self._handle(request, chat=False)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
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
            api="chat" if chat else "responses",
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
                chat_as_responses(body) if chat else body,
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
        if fault is Fault.ECHO_CREDENTIALS:
            echoed = ", ".join(
                f"{name}: {value}"
                for name, value in request.headers.items()
                if name.lower() == "authorization" or name.lower().endswith(("-token", "-key"))
            )
            message = f"Invalid request; credentials received: {echoed}"
            return self._error(record, 400, message, "invalid_request_error", None)
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
        usage_shape = chat_usage if chat else usage_of
        usage = None if fault is Fault.MISSING_USAGE else usage_shape(plan, cached)
        if plan.stream:
            return await self._stream(request, record, plan, body, usage, fault, delay, chat)
        if fault is Fault.STREAM_BREAK:
            return self._drop(request)
        if delay > 0 and not await self._sleep(delay):
            return self._drop(request)
        if chat:
            answer = chat_body(plan, new_id("chatcmpl-"), int(time.time()), usage)
        else:
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
        chat: bool,
    ) -> web.StreamResponse:
        """An SSE answer: its head at once, the rest after ``delay`` (or a fault instead)."""
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
        chunks, created_at = self._config.stream_chunks, int(time.time())
        encode: Callable[[list[dict[str, Any]], int, bool], bytes]
        if chat:
            options = body.get("stream_options")
            include = isinstance(options, dict) and options.get("include_usage") is True
            events = chat_chunks(
                plan, new_id("chatcmpl-"), created_at, usage if include else None, chunks
            )
            head, tail = events[:1], events[1:]

            def encode(items: list[dict[str, Any]], first: int, done: bool) -> bytes:
                return sse_data(items, done=done)

            malformed = b'data: {"id": "chatcmpl-\n\n'
        else:
            ids = (new_id("resp_"), new_id("msg_"))
            head = stream_head(plan, body, ids, created_at)
            status = "incomplete" if plan.incomplete else "completed"
            tail = stream_tail(plan, body, ids, created_at, status, usage, chunks)

            def encode(items: list[dict[str, Any]], first: int, done: bool) -> bytes:
                return sse(items, first)

            malformed = b'event: response.output_text.delta\ndata: {"type": "resp\n\n'
        await response.write(encode(head, 0, False))
        if delay > 0 and not await self._sleep(delay):
            self._drop(request)
            return response
        if fault is Fault.MALFORMED_JSON:
            await response.write(malformed)
        elif fault is Fault.STREAM_BREAK:
            # Half the events, then the socket closes: the client reads an incomplete body.
            await response.write(encode(tail[: max(len(tail) // 2, 1)], len(head), False))
            self._drop(request)
            return response
        elif self._config.stream_interval_s > 0:
            # One event at a time, pausing after each text delta: a stream that takes time.
            for i, event in enumerate(tail):
                await response.write(encode([event], len(head) + i, i == len(tail) - 1))
                if is_text_delta(event) and not await self._sleep(self._config.stream_interval_s):
                    self._drop(request)
                    return response
        else:
            await response.write(encode(tail, len(head), True))
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


# The ways to run it, importable from here too (they import MockServer when run: no cycle).
from ._mock_process import (  # noqa: E402
    add_arguments,
    run_from_args,
    run_in_process,
    running_in_process,
    running_in_thread,
    serve,
)

"""The ``llmtrail`` command line.

``demo`` and ``mock-server`` live here; every other command is registered by the package that
owns it (storage, telemetry) through the ``llmtrail.commands`` entry points, so this module
imports neither package.

Exit codes: 0 success, 1 failure, 2 bad usage, 130 after Ctrl-C. Errors are one line, never a
traceback, whatever the exception (:func:`main` catches them all; a BrokenPipe from
``| head`` is a success).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ._errors import ConfigurationError, LLMTrailError
from ._events import Event, EventType
from ._output import add_format_options, chosen_format
from ._redact import mask_url_password
from ._summary import error_summary, latency_figures, print_summary, send_rate, ttft_figures
from ._types import GenerationRequest, GenerationResult

__all__ = ["build_parser", "main"]

_log = logging.getLogger(__name__)

_TOPICS = [
    "the water cycle",
    "compound interest",
    "TCP congestion control",
    "photosynthesis",
    "the Roman republic",
    "sourdough starters",
    "black holes",
    "vaccines",
    "jazz harmony",
    "plate tectonics",
    "garbage collection",
    "the French revolution",
    "tidal energy",
]
_OPERATIONS = [
    ("summarize", "Summarize {topic} in two sentences."),
    ("classify", "Is this text about science, history or craft? Text: {topic}."),
    ("explain", "Explain {topic} to a ten-year-old, briefly."),
]
_TENANTS = ("acme", "globex", "initech")


class _Tally:
    """A tiny event sink for the demo's summary: counts 429s and retries, and when each HTTP
    attempt left, as they happen: its ``sent`` time plus, when the send-time hook saw it, the
    time until its body was written (a request granted ahead is held at the wire until its
    slot's time, so that is when the provider can count it)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.sent_at: list[float] = []  # POSIX seconds
        self.ttft: list[float] = []  # per streamed call: seconds to its first text delta
        self._sent: dict[tuple[str, int], float] = {}

    def emit(self, event: Event) -> bool:
        kind, payload = event.type, event.payload
        if kind is EventType.SENT:
            self.counts["sent"] += 1
            self._sent[event.call_id, payload["attempt"]] = event.occurred_at.timestamp()
        elif kind is EventType.RECEIVED or kind is EventType.ATTEMPT_FAILED:
            if kind is EventType.ATTEMPT_FAILED:
                self.counts[f"failed:{payload.get('error_type')}"] += 1
            sent = self._sent.pop((event.call_id, payload.get("attempt", 1)), None)
            if sent is not None and not payload.get("not_sent"):  # it left: it counts
                self.sent_at.append(sent + (payload.get("body_sent_s") or 0.0))
        elif kind is EventType.RETRY_SCHEDULED:
            self.counts["retries"] += 1
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _add_demo(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a real workload through the pipeline and print a usage summary",
        description=(
            "Runs N calls concurrently through BaseLLMService against the built-in local "
            "OpenAI-compatible server (or OpenAI with --openai and OPENAI_API_KEY), records "
            "every event in the store, and ends with a summary: outcomes, each distinct error "
            "once with its message and fix, the achieved send rate against the limit, tokens "
            "and cost (unpriced calls are counted, never priced at $0). Per-call warnings are "
            "left out of stderr unless LLMTRAIL_LOG_LEVEL is set: the summary reports every "
            "failure."
        ),
    )
    p.add_argument("--calls", type=int, default=200, help="number of calls (default 200)")
    p.add_argument("--concurrency", type=int, default=50, help="max concurrent requests")
    p.add_argument("--max-rpm", type=int, default=1200, help="RPM limit of the gate")
    p.add_argument("--max-tpm", type=int, default=2_000_000, help="TPM limit of the gate")
    p.add_argument("--window", type=float, default=2.0, help="rpm_window_seconds (default 2)")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--latency", type=float, default=0.05, help="local server latency, seconds")
    p.add_argument("--fault-rate", type=float, default=0.03, help="local server 5xx share")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--store",
        default=os.environ.get("LLMTRAIL_STORE_URL", "sqlite+aiosqlite:///llmtrail.db"),
        help="event store URL (env LLMTRAIL_STORE_URL; default sqlite+aiosqlite:///llmtrail.db)",
    )
    p.add_argument("--no-store", action="store_true", help="do not persist events")
    p.add_argument("--openai", action="store_true", help="call OpenAI (needs OPENAI_API_KEY)")
    add_format_options(p, formats=("table", "plain", "json"))
    p.add_argument(
        "--api",
        choices=("responses", "chat"),
        default="responses",
        help="the API to call: the Responses API or Chat Completions (default responses)",
    )
    p.add_argument(
        "--stream", action="store_true", help="stream the answers (the summary adds TTFT)"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    for option, value in (
        ("--calls", args.calls),
        ("--concurrency", args.concurrency),
        ("--max-rpm", args.max_rpm),
        ("--max-tpm", args.max_tpm),
    ):
        if value < 1:
            raise ConfigurationError(f"{option} {value} is invalid: use an integer >= 1")
    for option, number in (("--window", args.window), ("--latency", args.latency)):
        if not number >= 0 or (option == "--window" and number == 0):
            raise ConfigurationError(f"{option} {number} is invalid: use a positive number")
    if not 0 <= args.fault_rate <= 1:
        raise ConfigurationError(
            f"--fault-rate {args.fault_rate} is invalid: use a share in [0, 1]"
        )
    if args.max_rpm * args.window / 60 < 1:
        raise ConfigurationError(
            f"--max-rpm {args.max_rpm} with --window {args.window} allows less than one call "
            "per window: raise --max-rpm or lengthen --window"
        )
    if args.openai and not os.environ.get("OPENAI_API_KEY"):
        raise ConfigurationError("--openai needs OPENAI_API_KEY in the environment")
    fmt = chosen_format(args.format)
    args.json = fmt == "json"
    library = logging.getLogger("llmtrail")
    level = library.level
    if "LLMTRAIL_LOG_LEVEL" not in os.environ:
        # The summary reports every failure, grouped: one warning per failed call is noise.
        library.setLevel(logging.ERROR)
    try:
        summary = asyncio.run(_run_demo(args))
    finally:
        library.setLevel(level)
    if fmt == "json":
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary, fmt)
    return 0 if summary["failed"] == 0 or summary["succeeded"] > 0 else 1


async def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from llmtrail.testing._mock_server import MockServer, MockServerConfig

    from ._service import BaseLLMService

    server: Any = None
    base_url: str | None = None
    api_key: str | None = None
    if not args.openai:
        server = MockServer(
            MockServerConfig(
                latency_s=args.latency,
                latency_jitter_s=args.latency / 2,
                rpm_limit=args.max_rpm,
                tpm_limit=args.max_tpm,
                window_s=args.window,
                fault_500_rate=args.fault_rate / 2,
                fault_503_rate=args.fault_rate / 2,
                seed=args.seed,
                # A streamed answer's text then takes as long again as its first token.
                stream_interval_s=args.latency / 4 if args.stream else 0.0,
            )
        )
        base_url = f"{await server.start()}/v1"
        api_key = "sk-local-demo"
    tally = _Tally()
    results: list[GenerationResult] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with BaseLLMService(
            args.model,
            max_rpm=args.max_rpm,
            max_tpm=args.max_tpm,
            rpm_window_seconds=args.window,
            max_concurrent_requests=args.concurrency,
            base_url=base_url,
            api_key=api_key,
            store_url=None if args.no_store else args.store,
            sinks=[tally],
            provider="openai-chat" if args.api == "chat" else "openai",
        ) as service:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
                disable=args.json or not sys.stderr.isatty(),
            ) as progress:
                task = progress.add_task("calls", total=args.calls)

                async def one(i: int) -> None:
                    op, template = _OPERATIONS[i % len(_OPERATIONS)]
                    topic = _TOPICS[i % len(_TOPICS)]
                    request = GenerationRequest(
                        user_prompt=template.format(topic=topic),
                        system_prompt="You are concise.",
                        max_output_tokens=80,
                        metadata={"tenant": _TENANTS[i % len(_TENANTS)], "demo": "1"},
                        request_id=f"demo-{i}",
                    )
                    if args.stream:
                        results.append(await _streamed(service, request, op, tally))
                    else:
                        results.append(await service.execute_generation_async(request, op))
                    progress.advance(task)

                await asyncio.gather(*(one(i) for i in range(args.calls)))
            await service.flush()
        elapsed = loop.time() - started
    finally:
        server_429 = 0
        if server is not None:
            server_429 = sum(1 for r in server.log if r.status == 429)
            await server.stop()
    return _summarise(results, tally, elapsed, server_429, args)


async def _streamed(
    service: Any, request: GenerationRequest, op: str, tally: _Tally
) -> GenerationResult:
    """One streamed call, read to its end; the time to its first delta goes to the tally."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result: GenerationResult | None = None
    async with service.execute_generation_stream(request, op) as stream:
        async for item in stream:
            if isinstance(item, GenerationResult):
                result = item
            elif len(tally.ttft) < tally.counts["streams"] + 1:
                tally.ttft.append(loop.time() - started)
        tally.counts["streams"] += 1
    assert result is not None
    return result


def _summarise(
    results: list[GenerationResult],
    tally: _Tally,
    elapsed: float,
    server_429: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    priced = [r.usage.cost_usd for r in results if r.usage.cost_usd is not None]
    unpriced = sum(
        1
        for r in results
        if r.usage.cost_usd is None and (r.usage.input_tokens or r.usage.output_tokens)
    )
    return {
        "calls": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "errors": error_summary(results),
        "http_attempts": tally.counts["sent"],
        "retries": tally.counts["retries"],
        "rate_limited_seen": tally.counts["failed:rate_limited"],
        "server_429s": server_429,
        "input_tokens": sum(r.usage.input_tokens for r in results),
        "output_tokens": sum(r.usage.output_tokens for r in results),
        # None, never 0, when no call could be priced; `unpriced_calls` says how many are out.
        "cost_usd": sum(priced, Decimal(0)) if priced or not unpriced else None,
        "unpriced_calls": unpriced,
        "elapsed_s": round(elapsed, 3),
        **send_rate(tally.sent_at, args.window),
        "rpm_limit": args.max_rpm,
        "window_s": args.window,
        "window_capacity": int(args.max_rpm * args.window / 60),
        **latency_figures(results),
        "api": args.api,
        "stream": args.stream,
        **(ttft_figures(tally.ttft) if args.stream else {}),
        "store": None if args.no_store else mask_url_password(args.store),
    }


def _add_mock_server(subparsers: Any) -> None:
    # The options come from the server's config alone: its HTTP stack (aiohttp, the `server`
    # extra) is imported only when the server runs.
    from llmtrail.testing._mock_process import add_arguments, run_from_args

    p = subparsers.add_parser(
        "mock-server",
        help="run the local OpenAI-compatible server (/v1/responses, /v1/chat/completions)",
        description="A local Responses API server with rate limits, latency and faults.",
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtrail",
        description="Rate-aware, observable LLM calls: events, traces, usage and replay.",
        epilog="Every command that reports results takes --json; on a terminal output is a "
        "table that fits its width, in a pipe plain lines. Exit codes: 0 ok, 1 failure, 2 bad "
        "usage, 130 after Ctrl-C; errors are one line on stderr. `llmtrail COMMAND --help` "
        "says more.",
    )
    try:
        version = importlib.metadata.version("llmtrail")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"llmtrail {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_mock_server(subparsers)
    for entry in sorted(
        importlib.metadata.entry_points(group="llmtrail.commands"), key=lambda e: e.name
    ):
        try:
            register = entry.load()
        except Exception as exc:  # a plugin that cannot load must not break the others
            print(
                f"llmtrail: warning: commands from {entry.name!r} unavailable: {exc}",
                file=sys.stderr,
            )
            continue
        register(subparsers)
    return parser


def _setup_logging() -> None:
    """Let the telemetry package (if installed) set up structlog: formats and redaction."""
    for entry in importlib.metadata.entry_points(group="llmtrail.setup"):
        try:
            entry.load()(level=os.environ.get("LLMTRAIL_LOG_LEVEL", "WARNING"))
        except Exception as exc:
            print(f"llmtrail: warning: setup {entry.name!r} failed: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Whatever goes wrong ends as one line on stderr and an exit code:
    0 ok, 1 failure, 2 bad usage, 130 after Ctrl-C; never a traceback (LLMTRAIL_LOG_LEVEL=DEBUG
    logs it)."""
    name = "llmtrail"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # --help and usage errors exit here, before any setup
        _setup_logging()
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 2
        name = f"llmtrail {args.command}"
        code = int(func(args) or 0)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmtrail ... | head`: the reader has what it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigurationError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"{name}: error: out of memory; ask for less (a LIMIT, --limit, or a narrower "
            "--since/--until)",
            file=sys.stderr,
        )
        return 1
    except (LLMTrailError, ValueError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        _log.debug("command failed", exc_info=True)
        print(
            f"{name}: error: {type(exc).__name__}: {exc} (LLMTRAIL_LOG_LEVEL=DEBUG logs the "
            "traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

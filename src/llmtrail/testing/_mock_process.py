"""Running the local server: blocking (``llmtrail mock-server``), in a child process, or in a
thread; and the command-line options of its config.

Invariants:
- Every way of running it stops the server on exit (Ctrl-C, SIGTERM, the ``with`` block's end),
  and a child process that reports no URL in time is killed, never left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import select
import signal
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from llmtrail.pipeline._errors import require_extra

from ._mock_config import MockServerConfig

if TYPE_CHECKING:
    from ._mock_server import MockServer

__all__ = [
    "add_arguments",
    "run_from_args",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
    "serve",
]


# ---------------------------------------------------------------- CLI and child process


def serve(
    config: MockServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the server until Ctrl-C or SIGTERM (blocking). ``on_ready`` receives the URL."""
    require_extra("aiohttp", "server", "the local OpenAI-compatible server (llmtrail mock-server)")

    async def main() -> None:
        from ._mock_server import MockServer

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
        print(
            f"llmtrail mock-server: POST {url}/v1/responses or {url}/v1/chat/completions; "
            "Ctrl-C to stop",
            file=sys.stderr,
        )

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
    """Start ``python -m llmtrail.testing._mock_process`` in a child process: ``(url, stop)``.

    A benchmark's client then does not share a core with the server. ``stop()`` sends SIGTERM
    and waits (SIGKILL after 10 s); it is idempotent.
    """
    # `python -m llmtrail.testing._mock_process`: importing `llmtrail` and `llmtrail.testing`
    # is light (the OpenAI SDK is imported only when the request path is used), so the child
    # starts in well under a second.
    argv = [
        sys.executable,
        "-m",
        "llmtrail.testing._mock_process",
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
            f"(exit code {proc.returncode}); run `python -m llmtrail.testing._mock_process "
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
    from ._mock_server import MockServer

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
        prog="python -m llmtrail.testing._mock_process",
        description="A local OpenAI-compatible server (/v1/responses, /v1/chat/completions).",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_main())

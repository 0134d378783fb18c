"""The child process of the crash test: makes calls into a store until it is killed.

``python _worker.py STORE_URL`` starts a local server in-process (some of its answers hang
forever, so calls are always in flight), then loops: start a few calls, ``await
service.flush()``, and print one line ``ACK {"round": n, "events": [...]}`` listing the event ids
that were emitted before that flush began. A flush returns only when those events are committed,
so every id printed is a promise the store must keep even after SIGKILL.

Protocol lines start with ``ACK `` and go to stdout; logs go to stderr. Every loop is bounded:
the worker stops by itself after ``ROUNDS`` rounds if nobody kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys

import structlog

from llmtrail.pipeline import BaseLLMService, Event, GenerationRequest
from llmtrail.testing._mock_server import MockServer, MockServerConfig

ROUNDS = 2_000
CALLS_PER_ROUND = 8


class IdSink:
    """Remembers every emitted event id, in emit order."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def emit(self, event: Event) -> bool:
        self.ids.append(event.event_id)
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def run(store_url: str) -> None:
    config = MockServerConfig(latency_s=0.02, latency_jitter_s=0.05, fault_hang_rate=0.1, seed=5)
    ids = IdSink()
    async with (
        MockServer(config) as server,
        BaseLLMService(
            base_url=f"{server.url}/v1",
            api_key="sk-test-crash-worker",
            store_url=store_url,
            sinks=[ids],
            tracing=False,
            max_rpm=None,
            max_tpm=None,
            max_concurrent_requests=1_000,
            request_timeout_s=600.0,
        ) as service,
    ):
        tasks: set[asyncio.Task[object]] = set()
        acked = 0
        for round_ in range(ROUNDS):
            for k in range(CALLS_PER_ROUND):
                request = GenerationRequest(user_prompt=f"crash round {round_} call {k}")
                task = asyncio.create_task(service.execute_generation_async(request, "crash"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.02)
            upto = len(ids.ids)
            await service.flush()
            line = json.dumps({"round": round_, "events": ids.ids[acked:upto]})
            sys.stdout.write(f"ACK {line}\n")
            sys.stdout.flush()
            acked = upto
        for task in tasks:
            task.cancel()


def main() -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(run(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

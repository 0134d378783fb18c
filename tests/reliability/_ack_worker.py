"""The child process of the write-ahead kill test: makes calls until it is killed.

``python _ack_worker.py STORE_URL SERVER_URL MODE [DURABILITY]`` calls the local server at
SERVER_URL (run by the parent, so its log outlives this process) and prints one line
``DONE <call_id>`` to stdout, flushed, as each call's result comes back to the application.
Every id printed is a result the application saw, so the store must hold that call's
``completed`` even after SIGKILL. MODE ``burst`` starts all calls at once, ``steady`` starts
them at a steady rate. DURABILITY (default ``write_ahead``) lets a developer run the test
against ``async`` to see it fail. Logs go to stderr. Every loop is bounded: the worker stops
by itself after ``CALLS`` calls if nobody kills it.
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from llmtrail.pipeline import BaseLLMService, GenerationRequest

CALLS = 4_000
STEADY_PER_S = 300


async def run(store_url: str, server_url: str, mode: str, durability: str) -> None:
    async with BaseLLMService(
        base_url=f"{server_url}/v1",
        api_key="sk-test-kill-worker",
        store_url=store_url,
        tracing=False,
        max_rpm=None,
        max_tpm=None,
        max_concurrent_requests=200,
        durability=durability,
    ) as service:
        out = sys.stdout

        async def one(i: int) -> None:
            request = GenerationRequest(user_prompt=f"kill {mode} {i}")
            result = await service.execute_generation_async(request, "kill")
            out.write(f"DONE {result.call_id}\n")
            out.flush()

        tasks = []
        for i in range(CALLS):
            tasks.append(asyncio.create_task(one(i)))
            if mode == "steady":
                await asyncio.sleep(1 / STEADY_PER_S)
        await asyncio.gather(*tasks)


def main() -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    store_url, server_url, mode = sys.argv[1:4]
    durability = sys.argv[4] if len(sys.argv) > 4 else "write_ahead"
    asyncio.run(run(store_url, server_url, mode, durability))
    return 0


if __name__ == "__main__":
    sys.exit(main())

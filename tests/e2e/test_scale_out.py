"""Scale-out, end to end: four processes share one rate budget (Redis) and one store (PostgreSQL).

Four worker processes each run a ``BaseLLMService`` with ``max_rpm=1200`` on a 1 s window
(20 requests per window) against one local OpenAI-compatible server in its own process that
enforces the same limit. Alone, each would send 20 per window; together, through the shared
Redis gate, they must send 20 per window in all. Each worker first makes one warm-up call (the
SDK's first call imports modules and opens connections), then waits for a common start signal.

Utilisation is measured from the server's log as the issue defines it: ``arrivals / (makespan *
20/s)``, the makespan running from the first to the last measured arrival. On a run of eight
windows a perfect gate scores a little above 1 (the first window is full at its start: the
strict bound is ``capacity * (makespan / window + 1)``, reported alongside). A slot stays taken
until its answer plus one window, so what the client spends between the grant and the answer
(CPU on a busy machine) is budget the processes cannot use: 0.9 leaves room for that.

This file is also the worker: ``python test_scale_out.py '<json>'`` runs one worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

WORKERS = 4
CALLS = 40
MAX_RPM = 1200
WINDOW_S = 1.0
CAPACITY = int(MAX_RPM * WINDOW_S / 60)  # 20 per window, shared by all four
MODEL = "gpt-4o-mini"
_MARK = "scale-out-worker: "  # our lines on the worker's stdout, which logs share


# -- the worker (a child process) -------------------------------------------------------------


async def _work(config: dict[str, Any]) -> dict[str, Any]:
    from llmtrail.pipeline import BaseLLMService, GenerationRequest

    service = BaseLLMService(
        MODEL,
        max_rpm=MAX_RPM,
        rpm_window_seconds=WINDOW_S,
        max_concurrent_requests=CALLS,
        base_url=config["base_url"],
        api_key=config["api_key"],
        store_url=config["store_url"],
        rate_limit_url=config["redis_url"],
        tracing=False,
    )
    async with service:
        warm = await service.execute_generation_async(
            GenerationRequest(user_prompt="warm up"), operation_name="warm_up"
        )
        print(_MARK + json.dumps({"ready": warm.success}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = await asyncio.gather(
            *(
                service.execute_generation_async(
                    GenerationRequest(user_prompt=f"{service.instance} item {i}: one line."),
                    operation_name="scale_out",
                )
                for i in range(CALLS)
            )
        )
    return {
        "instance": service.instance,
        "succeeded": sum(r.success for r in results),
        "errors": sorted({str(r.error_type) for r in results if not r.success}),
    }


def _worker_main(argv: list[str]) -> int:
    result = asyncio.run(_work(json.loads(argv[1])))
    print(_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv))


# -- the test ---------------------------------------------------------------------------------

import pytest  # noqa: E402  (the worker above must not need pytest)


class _Worker:
    """A worker process and a thread that reads its stdout into a queue.

    A thread, not ``select``: the pipe's reader buffers, so a line can be waiting in Python's
    buffer while the descriptor has nothing more to say.
    """

    def __init__(self, argv: list[str], env: dict[str, str], stderr: Path) -> None:
        self.stderr = stderr
        with stderr.open("w") as err:  # a file, not a pipe: a full pipe would block the worker
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env
            )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MARK):  # its log lines share the stdout
                self.lines.put(line[len(_MARK) :])

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def report(self, timeout_s: float) -> dict[str, Any]:
        try:
            parsed: dict[str, Any] = json.loads(self.lines.get(timeout=timeout_s))
        except queue.Empty:
            self.stop()
            err = self.stderr.read_text()[-3000:]
            raise AssertionError(
                f"worker {self.proc.pid} reported nothing within {timeout_s}s:\n{err}"
            ) from None
        return parsed

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _delete_gate_keys(redis_url: str, api_key: str) -> None:
    import redis

    fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"llmtrail:gate:*{fingerprint}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _server_log(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/_mock/log", timeout=30) as answer:
        records: list[dict[str, Any]] = json.loads(answer.read())["records"]
    return records


async def _store_figures(store_url: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from llmtrail.storage import create_engine, events
    from llmtrail.storage._projection_tables import calls, metrics_minute
    from llmtrail.storage._projections import run_projections

    engine = create_engine(store_url)
    try:
        await run_projections(engine)
        async with engine.connect() as conn:
            instances = {
                row[0]
                for row in await conn.execute(
                    select(events.c.instance).where(events.c.type == "completed").distinct()
                )
            }
            sent = await conn.scalar(select(func.count()).where(events.c.type == "sent"))
            call_rows = await conn.scalar(select(func.count()).select_from(calls))
            succeeded = await conn.scalar(
                select(func.count()).select_from(calls).where(calls.c.outcome == "succeeded")
            )
            requests_sent = await conn.scalar(select(func.sum(metrics_minute.c.requests_sent)))
            rate_limited = await conn.scalar(select(func.sum(metrics_minute.c.rate_limited)))
    finally:
        await engine.dispose()
    return {
        "instances": instances,
        "sent_events": sent,
        "calls": call_rows,
        "succeeded": succeeded,
        "requests_sent": requests_sent,
        "rate_limited": rate_limited,
    }


@pytest.mark.slow
async def test_four_processes_share_one_budget_and_one_store(
    redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    from llmtrail.storage import migrate
    from llmtrail.testing._mock_server import MockServerConfig, run_in_process

    await migrate(pg_url)  # once, before four writers open the store
    server_url, stop_server = run_in_process(
        MockServerConfig(rpm_limit=MAX_RPM, window_s=WINDOW_S, output_tokens_max=30)
    )
    api_key = f"sk-test-{uuid.uuid4().hex}"
    config = {
        "base_url": f"{server_url}/v1",
        "api_key": api_key,
        "store_url": pg_url,
        "redis_url": redis_url,
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    workers: list[_Worker] = []
    try:
        for i in range(WORKERS):
            argv = [sys.executable, __file__, json.dumps(config)]
            workers.append(_Worker(argv, env, tmp_path / f"worker{i}.log"))
        for worker in workers:
            assert worker.report(120)["ready"]
        time.sleep(WINDOW_S + 0.2)  # the warm-up slots age out of the shared window
        go = time.monotonic()  # one clock for all processes on this host (CLOCK_MONOTONIC)
        for worker in workers:
            worker.send("go")
        results = [worker.report(120) for worker in workers]
        for worker in workers:
            worker.proc.wait(timeout=60)
        log = _server_log(server_url)
    finally:
        for worker in workers:
            worker.stop()
        stop_server()
        _delete_gate_keys(redis_url, api_key)

    assert [r["errors"] for r in results] == [[]] * WORKERS
    assert sum(r["succeeded"] for r in results) == WORKERS * CALLS
    statuses = [r["status"] for r in log]
    assert statuses.count(429) == 0, "the shared gate let the four processes overshoot"
    assert len(log) == WORKERS * (CALLS + 1)
    measured = sorted(r["arrival_monotonic"] for r in log if r["arrival_monotonic"] >= go)
    assert len(measured) == WORKERS * CALLS
    makespan = measured[-1] - measured[0]
    utilisation = len(measured) / (makespan * CAPACITY / WINDOW_S)
    strict = len(measured) / (CAPACITY * (makespan / WINDOW_S + 1))
    assert utilisation >= 0.9, (
        f"only {utilisation:.0%} of the shared budget was used ({strict:.0%} counting the "
        f"first window; {len(measured)} arrivals in {makespan:.2f} s)"
    )

    store = await _store_figures(pg_url)
    assert store["instances"] == {r["instance"] for r in results}
    assert len(store["instances"]) == WORKERS
    assert store["sent_events"] == len(log)
    assert store["calls"] == store["succeeded"] == WORKERS * (CALLS + 1)
    assert store["requests_sent"] == len(log)
    assert store["rate_limited"] == 0

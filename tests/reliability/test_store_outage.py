"""Store outages: no event is lost, every wait is bounded, one clear log line names the problem.

- Write-ahead (the default): while the store cannot commit, a call is not sent and returns
  ``store_unavailable`` within ``store_timeout_s``; the server receives nothing; memory stays
  bounded however many calls arrive; the next call after the outage succeeds (no restart).
- ``durability="async"``: another connection holds the SQLite write lock (``BEGIN
  EXCLUSIVE``) for longer than the writer's 5 s busy timeout while calls run. The calls finish
  while the lock is still held; no row is committed during the lock; afterwards every emitted
  event is stored, once.
- PostgreSQL: the server is restarted mid-run (``pg_ctlcluster ... restart``) when
  ``LLMTRAIL_REQUIRE_PG=1`` (CI) or ``LLMTRAIL_PG_RESTART=1``; elsewhere the writer's
  connections are killed with ``pg_terminate_backend`` instead, so that a developer's run does
  not restart a server other people's tests are using. Either way the server accepts
  connections again when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from structlog.testing import capture_logs

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import (
    assert_store_equals_emitted,
    assert_streams_complete,
    sqlite_path,
    stored_events,
)

pytestmark = pytest.mark.timeout(150)

LOCK_S = 6.0  # longer than the writer's busy timeout (5 s), so the writer really sees the lock
UNAVAILABLE = "event store unavailable"


def service_for(
    server: Any, store_url: str, recorder: RecordingSink, **options: Any
) -> BaseLLMService:
    return BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test-store-outage",
        store_url=store_url,
        sinks=[recorder],
        tracing=False,
        max_rpm=None,
        max_tpm=None,
        max_concurrent_requests=20,
        **options,
    )


async def run_calls(service: BaseLLMService, label: str, n: int) -> list[Any]:
    return await asyncio.gather(
        *(
            service.execute_generation_async(GenerationRequest(user_prompt=f"{label} {i}"), label)
            for i in range(n)
        )
    )


def outage_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("log_level") in ("warning", "error", "critical")]


def row_count(path: Path) -> int:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        connection.close()


@pytest.mark.slow
async def test_with_async_durability_a_locked_store_delays_events_but_loses_none(
    mock_server_factory: Any, sqlite_url: str, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(latency_s=0.01)
    path = sqlite_path(sqlite_url)
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        async with service_for(server, sqlite_url, recorder, durability="async") as service:
            before = await run_calls(service, "before", 20)
            await service.flush()
            stored_before = row_count(path)
            assert stored_before == len(recorder.events)

            locker = sqlite3.connect(path, timeout=30, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            locked_at = loop.time()
            try:
                async with asyncio.timeout(60):  # a bound, not a speed claim
                    during = await run_calls(service, "during", 200)
                # The calls are done and the lock is still held: they never waited for it.
                assert locker.in_transaction
                await asyncio.sleep(max(0.0, LOCK_S - (loop.time() - locked_at)))
                assert row_count(path) == stored_before, "a batch was committed through the lock"
            finally:
                locker.rollback()
                locker.close()
            async with asyncio.timeout(60):
                await service.flush()
            after = await run_calls(service, "after", 20)

    assert all(r.success for r in [*before, *during, *after])
    assert_streams_complete(recorder.events)
    assert_store_equals_emitted(await stored_events(sqlite_url), recorder.events)
    problems = outage_lines(logs)
    assert len(problems) == 1, problems
    assert problems[0]["event"].startswith(UNAVAILABLE)
    assert "locked" in problems[0]["error"] and str(path) in problems[0]["store"]
    assert any(e["event"] == "event store available again" for e in logs)


# ---------------------------------------------------------------- write-ahead: bounded waits

STORE_TIMEOUT_S = 0.5
DURABILITY = os.environ.get("LLMTRAIL_OUTAGE_TEST_DURABILITY", "write_ahead")  # "async": fails


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[None]:
    """Another connection holds the write lock: the writer cannot commit until it ends."""
    locker = sqlite3.connect(path, timeout=30, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        locker.rollback()
        locker.close()


@pytest.mark.slow
async def test_a_store_that_cannot_commit_fails_calls_in_bounded_time_and_sends_nothing(
    mock_server_factory: Any, sqlite_url: str, recorder: RecordingSink
) -> None:
    server = await mock_server_factory()
    max_queue = 60
    service = service_for(
        server,
        sqlite_url,
        recorder,
        store_timeout_s=STORE_TIMEOUT_S,
        max_event_queue=max_queue,
        durability=DURABILITY,
    )
    loop = asyncio.get_running_loop()
    with capture_logs():
        async with service:
            writer = service.sinks[-1]
            warm = await run_calls(service, "warm", 2)
            arrived = len(server.log)
            with sqlite_locked(sqlite_path(sqlite_url)):
                started = loop.time()
                outage = await run_calls(service, "outage", 100)  # more than the queue holds
                took = loop.time() - started
                pending = writer.pending  # type: ignore[attr-defined]
            async with asyncio.timeout(30):
                after = await run_calls(service, "after", 5)  # recovered: no restart

    assert all(r.success for r in [*warm, *after])
    assert {str(r.error_type) for r in outage} == {"store_unavailable"}
    assert all("not sent" in str(r.error_message) for r in outage)
    assert len(server.log) == arrived + 5, "a request left while the store could not log it"
    # 100 calls, 20 at a time, each waiting at most STORE_TIMEOUT_S once: a bound, not a speed.
    assert took < 100 / 20 * STORE_TIMEOUT_S + 5
    # Memory stays bounded: the queue never holds much more than max_queue (the calls in
    # flight when it filled add their last few events).
    assert pending <= max_queue + 20 * 10
    # Everything the calls emitted to the store's side was written once the lock ended, and
    # every not-sent attempt says so right after its `sent`.
    stored = await stored_events(sqlite_url)
    for stream in assert_streams_complete(stored).values():
        types = [r.type for r in stream]
        if "sent" in types and stream[-1].payload["error_type"] == "store_unavailable":
            failed = stream[types.index("sent") + 1]
            assert failed.type == "attempt_failed", types
            assert failed.payload["error_type"] == "store_unavailable"


# ---------------------------------------------------------------- PostgreSQL


def may_restart_postgresql() -> bool:
    wanted = "1" in (os.environ.get("LLMTRAIL_REQUIRE_PG"), os.environ.get("LLMTRAIL_PG_RESTART"))
    return wanted and Path("/etc/postgresql").is_dir() and os.geteuid() == 0


def pg_ctlcluster(action: str) -> None:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def admin_dsn(pg_url: str) -> tuple[str, str]:
    """(a plain asyncpg DSN to the same server's ``test`` database, our database's name)."""
    parts = urlsplit(pg_url.replace("postgresql+asyncpg", "postgresql", 1))
    return parts._replace(path="/test").geturl(), parts.path.lstrip("/")


async def wait_until_postgresql_accepts(dsn: str) -> None:
    import asyncpg

    for _ in range(120):  # 60 s at most
        try:
            connection = await asyncpg.connect(dsn, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        await connection.close()
        return
    pg_ctlcluster("start")  # it did not come back: leave the machine as we found it
    raise AssertionError("PostgreSQL did not accept connections within 60 s of the outage")


async def terminate_writer_connections(dsn: str, database: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        killed = await connection.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await connection.close()
    return len(killed)


@pytest.mark.slow
@pytest.mark.postgres
async def test_postgresql_going_away_mid_run_loses_no_event(
    mock_server_factory: Any, pg_url: str, recorder: RecordingSink
) -> None:
    server = await mock_server_factory(latency_s=0.02)
    dsn, database = admin_dsn(pg_url)
    restart = may_restart_postgresql()
    with capture_logs() as logs:
        try:
            async with service_for(server, pg_url, recorder) as service:
                before = await run_calls(service, "before", 50)
                await service.flush()
                if restart:
                    outage = asyncio.create_task(asyncio.to_thread(pg_ctlcluster, "restart"))
                else:
                    outage = asyncio.create_task(terminate_writer_connections(dsn, database))
                during = await run_calls(service, "during", 200)
                killed = await outage
                await wait_until_postgresql_accepts(dsn)
                async with asyncio.timeout(90):
                    await service.flush()
                after = await run_calls(service, "after", 20)
        finally:
            await wait_until_postgresql_accepts(dsn)

    if not restart:
        assert killed >= 1, "no writer connection was open to terminate"
    assert all(r.success for r in [*before, *during, *after])
    assert_streams_complete(recorder.events)
    assert_store_equals_emitted(await stored_events(pg_url), recorder.events)
    problems = outage_lines(logs)
    # A restart is seconds of refused connections: exactly one line. A killed connection may
    # be replaced before any batch notices, so there at most one.
    assert len(problems) == 1 if restart else len(problems) <= 1, problems
    assert all(p["event"].startswith(UNAVAILABLE) for p in problems), problems


# ---------------------------------------------------------------- backpressure during an outage


async def test_with_async_durability_a_full_queue_makes_every_new_call_wait_for_room(
    mock_server_factory: Any, sqlite_url: str, recorder: RecordingSink
) -> None:
    from llmtrail import storage

    max_queue = 100
    server = await mock_server_factory()
    path = sqlite_path(sqlite_url)
    service = BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test-backpressure",
        store_url=sqlite_url,
        sinks=[recorder],
        tracing=False,
        max_event_queue=max_queue,
        durability="async",  # calls go on until the queue is full
    )
    with capture_logs():
        async with service:
            writer = next(s for s in service.sinks if isinstance(s, storage.EventWriter))
            await service.execute_generation_async(GenerationRequest(user_prompt="warm"), "bp")
            await service.flush()
            locker = sqlite3.connect(path, timeout=30, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                # Fill the queue: one call at a time until the writer is at its high-water mark.
                for i in range(max_queue):
                    if writer.pending >= max_queue:
                        break
                    await service.execute_generation_async(
                        GenerationRequest(user_prompt=f"fill {i}"), "fill"
                    )
                assert writer.pending >= max_queue
                started = len(recorder.events)

                # Now every new call must wait before it starts, however many arrive at once,
                # and one of them giving up (cancelled) must not let the others through.
                waiting = [
                    asyncio.create_task(
                        service.execute_generation_async(
                            GenerationRequest(user_prompt=f"wait {i}"), "wait"
                        )
                    )
                    for i in range(20)
                ]
                for _ in range(5):  # each task runs up to its first suspension
                    await asyncio.sleep(0)
                waiting[0].cancel()
                late = asyncio.create_task(
                    service.execute_generation_async(GenerationRequest(user_prompt="late"), "late")
                )
                for _ in range(5):
                    await asyncio.sleep(0)
                admitted = [e for e in recorder.events[started:] if e.type == "trace_created"]
                assert admitted == [], f"{len(admitted)} calls started with the queue full"
            finally:
                locker.rollback()
                locker.close()
            async with asyncio.timeout(60):
                done = await asyncio.gather(*waiting, late, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert all(not isinstance(r, BaseException) and r.success for r in done[1:])
    assert_streams_complete(recorder.events)
    assert_store_equals_emitted(await stored_events(sqlite_url), recorder.events)

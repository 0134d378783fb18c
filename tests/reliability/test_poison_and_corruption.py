"""No poison rows, and a damaged store is not an outage.

- Strings no UTF-8 encoder accepts (lone surrogates) in the operation name, the request id, a
  metadata key and the model are stored with U+FFFD in their place, on SQLite and PostgreSQL;
  the stdlib drivers read every row back, and ``llmtrail usage`` / ``projections rebuild``
  still work.
- A SQLite file damaged under a running service, a foreign SQLite file, and a PostgreSQL
  schema newer than this llmtrail: one clear line naming the store and what to do, calls fail
  fast, and ``aclose()`` returns. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmtrail import storage
from llmtrail.pipeline import BaseLLMService, GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import assert_streams_complete, sqlite_path, stored_events

pytestmark = pytest.mark.timeout(120)

LLMTRAIL = Path(sys.executable).with_name("llmtrail")
BOUND_S = 10.0  # "fails fast": far below the writer's endless retries, far above any jitter


def service_for(server: Any, store_url: str, **options: Any) -> BaseLLMService:
    return BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key="sk-test-poison",
        store_url=store_url,
        tracing=False,
        max_rpm=None,
        max_tpm=None,
        store_timeout_s=BOUND_S,
        **options,
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LLMTRAIL), *args], capture_output=True, text=True, timeout=60, check=False
    )


# ---------------------------------------------------------------- poison strings


@pytest.mark.slow
async def test_lone_surrogates_are_stored_replaced_and_usage_still_works(
    mock_server_factory: Any, store_url: str, recorder: RecordingSink
) -> None:
    server = await mock_server_factory()
    async with service_for(server, store_url, sinks=[recorder]) as service:
        request = GenerationRequest(
            user_prompt="hi", request_id="req\udc00", metadata={"k\ud83d": "v"}
        )
        named = await service.execute_generation_async(request, "op\ud83dx")
        odd_model = GenerationRequest(user_prompt="hi", model="gpt-4o-mini\ud83d")
        await service.execute_generation_async(odd_model, "pair\ud83d\ude00")
    assert named.success

    stored = await stored_events(store_url)  # sqlite3 / asyncpg: a poison row fails here
    assert len(stored) == len(recorder.events)
    calls = assert_streams_complete(stored)
    created = calls[named.call_id][0].payload
    assert created["operation_name"] == "op\ufffdx"
    assert created["request_id"] == "req\ufffd"
    assert created["metadata"] == {"k\ufffd": "v"}
    operations = {s[0].payload["operation_name"] for s in calls.values()}
    assert operations == {"op\ufffdx", "pair\U0001f600"}  # a well-formed pair is joined
    models = {s[-1].payload["model"] for s in calls.values()}
    assert "gpt-4o-mini\ufffd" in models

    for args in (("projections", "rebuild"), ("usage",)):
        done = cli(*args, "--store", store_url)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert "2" in done.stdout  # both calls are counted


# ---------------------------------------------------------------- a damaged or foreign store


async def make_store(server: Any, url: str, calls: int) -> None:
    async with service_for(server, url) as service:
        for i in range(calls):
            await service.execute_generation_async(GenerationRequest(user_prompt=f"x {i}" * 50))


def damage(path: Path) -> None:
    """Overwrite every page but the first two (the schema) and the last with garbage."""
    page = 4096
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(2 * page)
        handle.write(os.urandom(size - 3 * page))


async def test_a_store_damaged_under_a_running_service_fails_calls_fast_and_closes(
    mock_server_factory: Any, sqlite_url: str
) -> None:
    server = await mock_server_factory()
    await make_store(server, sqlite_url, 200)
    path = sqlite_path(sqlite_url)
    damage(path)
    arrived = len(server.log)
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        service = service_for(server, sqlite_url)
        async with asyncio.timeout(BOUND_S):
            await service.start()
            started = loop.time()
            results = [
                await service.execute_generation_async(GenerationRequest(user_prompt="hi"))
                for _ in range(3)
            ]
            failed_in = loop.time() - started
            await service.aclose()  # returns: the damage was reported once already
    assert {str(r.error_type) for r in results} == {"store_unavailable"}
    assert len(server.log) == arrived, "a request left while the store could not log it"
    assert failed_in < BOUND_S / 2  # fast: it did not wait out store_timeout_s
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1, errors
    line = errors[0]["event"]
    assert str(path) in line and "move the file" in line and "\n" not in line


async def test_a_foreign_sqlite_file_is_refused_at_start_and_left_untouched(
    mock_server_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    server = await mock_server_factory()
    service = service_for(server, f"sqlite+aiosqlite:///{path}")
    with pytest.raises(storage.StoreCorruptError) as caught:
        async with asyncio.timeout(BOUND_S):
            await service.start()
    async with asyncio.timeout(BOUND_S):
        await service.aclose()
    message = str(caught.value)
    assert str(path) in message and "new file" in message and "\n" not in message
    with sqlite3.connect(path) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
    assert tables == {"customers"}
    assert len(server.log) == 0


@pytest.mark.postgres
async def test_a_postgresql_schema_newer_than_llmtrail_is_refused_at_start(
    mock_server_factory: Any, pg_url: str
) -> None:
    await storage.migrate(pg_url)
    engine = storage.create_engine(pg_url)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(
                "UPDATE alembic_version SET version_num = '9999_from_the_future'"
            )
    finally:
        await engine.dispose()
    server = await mock_server_factory()
    service = service_for(server, pg_url)
    with pytest.raises(storage.StoreSchemaError) as caught:
        async with asyncio.timeout(BOUND_S):
            await service.start()
    async with asyncio.timeout(BOUND_S):
        await service.aclose()
    message = str(caught.value)
    assert "9999_from_the_future" in message and "upgrade llmtrail" in message
    assert len(server.log) == 0

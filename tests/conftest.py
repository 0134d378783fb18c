"""Shared fixtures.

- The local OpenAI-compatible server fixtures live in ``llmtrail.testing.fixtures`` (loaded below).
- ``sqlite_url`` / ``pg_url`` / ``store_url`` give each test a fresh, empty event store.
  ``store_url`` is parametrised over both backends: one contract, several backends.
- PostgreSQL and Redis tests skip with a reason when the server is unreachable, and fail
  instead when ``LLMTRAIL_REQUIRE_PG=1`` / ``LLMTRAIL_REQUIRE_REDIS=1`` (as in CI).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["llmtrail.testing.fixtures"]

PG_ADMIN_DSN = os.environ.get("LLMTRAIL_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLMTRAIL_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _require_or_skip(service: str, env: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{service} is not reachable at {host}:{port}"
    if os.environ.get(env) == "1":
        pytest.fail(f"{message}, and {env}=1 requires it")
    pytest.skip(f"{message}; start it, or set {env}=1 to make this a failure")


def _run_pg_admin(statement: str) -> None:
    """Run one statement on the admin database with asyncpg (no other driver needed)."""
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'llmtrail.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    _require_or_skip("PostgreSQL", "LLMTRAIL_REQUIRE_PG", "127.0.0.1", 5432)
    name = f"llmtrail_t_{uuid.uuid4().hex[:12]}"
    _run_pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        _run_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh store on each backend in turn."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def redis_url() -> str:
    _require_or_skip("Redis", "LLMTRAIL_REQUIRE_REDIS", "127.0.0.1", 6379)
    return REDIS_URL


class RecordingSink:
    """An in-memory EventSink: every event, in emit order (a real sink, not a mock)."""

    def __init__(self) -> None:
        from llmtrail.pipeline import Event

        self.events: list[Event] = []

    def emit(self, event: object) -> bool:
        self.events.append(event)  # type: ignore[arg-type]
        return True

    async def wait_for_room(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def by_call(self) -> dict[str, list[object]]:
        calls: dict[str, list[object]] = {}
        for event in self.events:
            calls.setdefault(event.call_id, []).append(event)
        return calls

    def types(self, call_id: str) -> list[str]:
        return [str(e.type) for e in self.events if e.call_id == call_id]


@pytest.fixture
def recorder() -> RecordingSink:
    return RecordingSink()

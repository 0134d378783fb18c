"""pytest fixtures for llmtrail and its users (a plugin: ``pytest_plugins``).

- ``mock_server``: a started :class:`MockServer` with the default config, stopped after the test.
- ``sqlite_url`` / ``pg_url`` / ``store_url`` give each test a fresh, empty event store;
  ``store_url`` is parametrised over both backends (one contract, several backends).
  ``pg_url`` creates a database through ``LLMTRAIL_PG_ADMIN_DSN`` (default: postgres on
  127.0.0.1:5432, database ``test``) and drops it afterwards.
- ``redis_url``: ``LLMTRAIL_REDIS_URL`` (default redis://127.0.0.1:6379/0).
- PostgreSQL and Redis fixtures skip with a reason when the server is unreachable, and fail
  instead when ``LLMTRAIL_REQUIRE_PG=1`` / ``LLMTRAIL_REQUIRE_REDIS=1`` (as in CI).
- ``recorder``: a fresh :class:`~llmtrail.testing.RecordingSink`.
- ``mock_server_factory``: ``await factory(**config_fields)``, ``await factory(config)`` or
  ``await factory(clock=fake_clock, **config_fields)`` starts another server; every server it
  started is stopped after the test, even when the test fails.

Nothing in the library imports this module: it imports pytest.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import pytest_asyncio

from ._sinks import RecordingSink

if TYPE_CHECKING:
    from ._mock_server import MockServer, MockServerConfig

__all__ = [
    "MockServerFactory",
    "mock_server",
    "mock_server_factory",
    "pg_url",
    "recorder",
    "redis_url",
    "sqlite_url",
    "store_url",
]


class MockServerFactory(Protocol):
    async def __call__(
        self,
        config: MockServerConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        **fields: Any,
    ) -> MockServer: ...


@pytest_asyncio.fixture
async def mock_server() -> AsyncIterator[MockServer]:
    """A local OpenAI-compatible server on 127.0.0.1 with the default config."""
    from ._mock_server import MockServer

    async with MockServer() as server:
        yield server


@pytest_asyncio.fixture
async def mock_server_factory() -> AsyncIterator[MockServerFactory]:
    """Start servers with a given config (or config fields); all are stopped afterwards."""
    from ._mock_server import MockServer, MockServerConfig

    started: list[MockServer] = []

    async def make(
        config: MockServerConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        **fields: Any,
    ) -> MockServer:
        if config is not None and fields:
            raise TypeError("pass either a MockServerConfig or config fields, not both")
        server = MockServer(
            config if config is not None else MockServerConfig(**fields),
            clock=clock if clock is not None else time.monotonic,
        )
        await server.start()
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in reversed(started):
            await server.stop()


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


@pytest.fixture
def recorder() -> RecordingSink:
    """A fresh in-memory sink."""
    return RecordingSink()

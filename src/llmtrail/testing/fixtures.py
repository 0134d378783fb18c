"""pytest fixtures for the local OpenAI-compatible server (a plugin: ``pytest_plugins``).

- ``mock_server``: a started :class:`MockServer` with the default config, stopped after the test.
- ``mock_server_factory``: ``await factory(**config_fields)``, ``await factory(config)`` or
  ``await factory(clock=fake_clock, **config_fields)`` starts another server; every server it
  started is stopped after the test, even when the test fails.

Nothing in the library imports this module: it imports pytest.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest_asyncio

from ._mock_server import MockServer, MockServerConfig

__all__ = ["MockServerFactory", "mock_server", "mock_server_factory"]


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
    async with MockServer() as server:
        yield server


@pytest_asyncio.fixture
async def mock_server_factory() -> AsyncIterator[MockServerFactory]:
    """Start servers with a given config (or config fields); all are stopped afterwards."""
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

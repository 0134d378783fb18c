"""Test support for llmtrail and for applications that use it, apart from the request path.

- :class:`RecordingSink`: a real in-memory event sink that keeps every event in emit order.
- :class:`InMemoryEventStore`: an event store without a database: a sink whose events read
  back (``read``, ``events_for_call``, ``events_for_trace``) as from the SQL store.
- :class:`MockServer` (and :func:`running_in_process`, :func:`running_in_thread`): the local
  OpenAI-compatible server (``llmtrail mock-server``) with rate limits, latency, seeded faults
  and a request log. It needs the ``server`` extra (aiohttp); its names load on first use.
- :mod:`llmtrail.testing.fixtures`: pytest fixtures (the local server, fresh SQLite and
  PostgreSQL stores, Redis), loaded with ``pytest_plugins = ["llmtrail.testing.fixtures"]``.

Nothing in the request path imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtrail._lazy import lazy_names
from llmtrail.pipeline._errors import require_extra

from ._sinks import RecordingSink

if TYPE_CHECKING:
    from ._memory_store import InMemoryEventStore
    from ._mock_config import MockServerConfig
    from ._mock_process import run_in_process, running_in_process, running_in_thread
    from ._mock_server import MockServer

__all__ = [
    "InMemoryEventStore",
    "MockServer",
    "MockServerConfig",
    "RecordingSink",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
]

_SERVER_NAMES = frozenset(__all__) - {"InMemoryEventStore", "RecordingSink"}
# The in-memory store reads back through the SQL store's StoredEvent (SQLAlchemy): on first use.


_load = lazy_names(
    __name__,
    {
        "InMemoryEventStore": "._memory_store",
        "MockServer": "._mock_server",
        "MockServerConfig": "._mock_config",
        "run_in_process": "._mock_process",
        "running_in_process": "._mock_process",
        "running_in_thread": "._mock_process",
    },
)


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        require_extra("aiohttp", "server", "the local OpenAI-compatible server (llmtrail.testing)")
    return _load(name)

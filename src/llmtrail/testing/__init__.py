"""Test support for llmtrail and for applications that use it, apart from the request path.

- :class:`MockServer`: the local OpenAI-compatible server (``llmtrail mock-server``), with rate
  limits, latency, seeded faults and a request log. It needs the ``server`` extra (aiohttp).
- :mod:`llmtrail.testing.fixtures`: pytest fixtures, loaded with
  ``pytest_plugins = ["llmtrail.testing.fixtures"]``.

Nothing in the request path imports this package.
"""

from __future__ import annotations

from ._mock_server import (
    MockServer,
    MockServerConfig,
    run_in_process,
    running_in_process,
    running_in_thread,
)

__all__ = [
    "MockServer",
    "MockServerConfig",
    "run_in_process",
    "running_in_process",
    "running_in_thread",
]

"""Test support for llmtrail and for applications that use it, apart from the request path.

- :class:`MockServer`: the local OpenAI-compatible server (``llmtrail mock-server``), with rate
  limits, latency, seeded faults and a request log. It needs the ``server`` extra (aiohttp).
- :mod:`llmtrail.testing.fixtures`: pytest fixtures, loaded with
  ``pytest_plugins = ["llmtrail.testing.fixtures"]``.

Nothing in the request path imports this package.
"""

from __future__ import annotations

from llmtrail.pipeline._errors import require_extra

require_extra("aiohttp", "server", "the local OpenAI-compatible server (llmtrail.testing)")

from ._mock_server import (  # noqa: E402 (after the one-line error for a missing extra)
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

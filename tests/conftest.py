"""Shared fixtures: llmtrail's own pytest plugin, as an application would load it.

``llmtrail.testing.fixtures`` holds the local server, fresh SQLite / PostgreSQL stores
(``store_url`` runs a test on both), Redis and a recording sink.
"""

from __future__ import annotations

from llmtrail.testing import RecordingSink

pytest_plugins = ["llmtrail.testing.fixtures"]

__all__ = ["RecordingSink"]  # tests import it from here

"""The event store's contract (llmtrail.testing.store_contract) on SQLite and PostgreSQL.

The suite lives in the package, as an application would run it against its own backend; the
``store_url`` fixture (llmtrail.testing.fixtures) runs each test on both of ours.
"""

from __future__ import annotations

from llmtrail.testing.store_contract import *  # noqa: F403

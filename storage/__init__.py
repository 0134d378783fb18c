"""llmtrail's event store: the append-only SQL log of lifecycle events, and what reads it.

- :class:`EventWriter` (built by :func:`open_store_sink`, the ``store`` sink) appends events
  in batches, one writer per process; :class:`EventStore` reads them back in position order.
- The schema is created only by the Alembic migrations in ``migrations/`` (:func:`migrate`,
  ``llmtrail migrate``), and automatically when a writer opens a store that has none.
- SQLite (aiosqlite, a file) by default; PostgreSQL (asyncpg) for many processes or hosts.

Importing this package opens nothing and configures nothing.
"""

from __future__ import annotations

from ._engine import (
    DEFAULT_STORE_URL,
    STORE_URL_ENV,
    StoreClosedError,
    StoreConfigError,
    StoreCorruptError,
    StoreError,
    StoreSchemaError,
    StoreUnavailableError,
    create_engine,
    mask_url,
    store_url_from_environment,
)
from ._migrate import check_schema, ensure_schema, head_revision, migrate
from ._projections import (
    PROJECTIONS,
    ProjectionConflictError,
    ProjectionRunner,
    ProjectionStatus,
    UnknownProjectionError,
    calls,
    metrics_minute,
    projection_checkpoints,
    projection_status,
    rebuild,
    run_projections,
    usage_daily,
)
from ._reader import EventStore, IncompleteCall, StoredEvent
from ._replay import (
    ReplaySettings,
    ReplayStalledError,
    cheapest_meeting,
    replay,
    replay_async,
    sweep,
)
from ._schema import events, metadata, stored_payload
from ._workload import Workload, extract_workload, load_workload
from ._writer import EventWriter, open_store_sink

__all__ = [
    "DEFAULT_STORE_URL",
    "EventStore",
    "EventWriter",
    "IncompleteCall",
    "PROJECTIONS",
    "ProjectionConflictError",
    "ProjectionRunner",
    "ProjectionStatus",
    "ReplaySettings",
    "ReplayStalledError",
    "STORE_URL_ENV",
    "StoreClosedError",
    "StoreConfigError",
    "StoreCorruptError",
    "StoreError",
    "StoreSchemaError",
    "StoreUnavailableError",
    "StoredEvent",
    "UnknownProjectionError",
    "Workload",
    "calls",
    "cheapest_meeting",
    "check_schema",
    "create_engine",
    "ensure_schema",
    "events",
    "extract_workload",
    "head_revision",
    "load_workload",
    "mask_url",
    "metadata",
    "metrics_minute",
    "migrate",
    "open_store_sink",
    "projection_checkpoints",
    "projection_status",
    "rebuild",
    "replay",
    "replay_async",
    "run_projections",
    "store_url_from_environment",
    "stored_payload",
    "sweep",
    "usage_daily",
]

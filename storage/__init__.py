"""llmtrail's event store: the append-only SQL log of lifecycle events, and what reads it.

- :class:`EventWriter` (built by :func:`open_store_sink`, the ``store`` sink) appends events
  in batches, one writer per process; :class:`EventStore` reads them back in position order.
- The schema is created only by the Alembic migrations in ``migrations/`` (:func:`migrate`,
  ``llmtrail migrate``), and automatically when a writer opens a store that has none.
- SQLite (aiosqlite, a file) by default; PostgreSQL (asyncpg) for many processes or hosts.

Importing this package opens nothing, configures nothing and needs no extra: every name loads
on first use, so ``import llmtrail.storage`` (and the CLI that registers its commands) stays
light, and replay (numpy, the ``replay`` extra) is imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrail._lazy import lazy_names

if TYPE_CHECKING:
    from ._base import (
        DEFAULT_STORE_URL,
        PROJECTIONS,
        STORE_URL_ENV,
        StoreClosedError,
        StoreConfigError,
        StoreCorruptError,
        StoreError,
        StoreSchemaError,
        StoreUnavailableError,
        mask_url,
        store_url_from_environment,
    )
    from ._engine import create_engine
    from ._migrate import (
        check_schema,
        ensure_schema,
        head_revision,
        migrate,
    )
    from ._projections import (
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
    from ._reader import (
        EventStore,
        IncompleteCall,
        StoredEvent,
    )
    from ._replay import (
        ReplayStalledError,
        replay,
        replay_async,
    )
    from ._replay_model import (
        ReplaySettings,
    )
    from ._replay_plan import (
        Recommendation,
        Tier,
        recommend,
        sweep,
    )
    from ._schema import (
        events,
        metadata,
        stored_payload,
    )
    from ._workload import (
        Workload,
    )
    from ._workload_read import (
        extract_workload,
        load_workload,
    )
    from ._writer import (
        EventWriter,
        open_store_sink,
    )

_LAZY = {
    "calls": "._projections",
    "check_schema": "._migrate",
    "create_engine": "._engine",
    "DEFAULT_STORE_URL": "._base",
    "ensure_schema": "._migrate",
    "events": "._schema",
    "EventStore": "._reader",
    "EventWriter": "._writer",
    "extract_workload": "._workload_read",
    "head_revision": "._migrate",
    "IncompleteCall": "._reader",
    "load_workload": "._workload_read",
    "mask_url": "._base",
    "metadata": "._schema",
    "metrics_minute": "._projections",
    "migrate": "._migrate",
    "open_store_sink": "._writer",
    "projection_checkpoints": "._projections",
    "projection_status": "._projections",
    "ProjectionConflictError": "._projections",
    "ProjectionRunner": "._projections",
    "PROJECTIONS": "._base",
    "ProjectionStatus": "._projections",
    "rebuild": "._projections",
    "recommend": "._replay_plan",
    "Recommendation": "._replay_plan",
    "replay": "._replay",
    "replay_async": "._replay",
    "ReplaySettings": "._replay_model",
    "ReplayStalledError": "._replay",
    "run_projections": "._projections",
    "STORE_URL_ENV": "._base",
    "store_url_from_environment": "._base",
    "StoreClosedError": "._base",
    "StoreConfigError": "._base",
    "StoreCorruptError": "._base",
    "stored_payload": "._schema",
    "StoredEvent": "._reader",
    "StoreError": "._base",
    "StoreSchemaError": "._base",
    "StoreUnavailableError": "._base",
    "sweep": "._replay_plan",
    "Tier": "._replay_plan",
    "UnknownProjectionError": "._projections",
    "usage_daily": "._projections",
    "Workload": "._workload",
}

__all__ = [
    "DEFAULT_STORE_URL",
    "EventStore",
    "EventWriter",
    "IncompleteCall",
    "PROJECTIONS",
    "ProjectionConflictError",
    "ProjectionRunner",
    "ProjectionStatus",
    "Recommendation",
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
    "Tier",
    "UnknownProjectionError",
    "Workload",
    "calls",
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
    "recommend",
    "replay",
    "replay_async",
    "run_projections",
    "store_url_from_environment",
    "stored_payload",
    "sweep",
    "usage_daily",
]

__getattr__ = lazy_names(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""Alembic environment of the event store.

Invariants:
- Logging is left alone: this module never calls ``logging.config.fileConfig``, which would
  disable every logger the application configured before the migration ran.
- Programmatic runs (:func:`storage.migrate`) pass an open synchronous ``Connection`` in
  ``config.attributes["connection"]``; the caller owns its transaction and lock, and this
  module runs the migrations on it. That is how a migration runs inside a running event loop
  (through ``AsyncConnection.run_sync``) without a nested ``asyncio.run``.
- Run by the ``alembic`` command instead, it opens its own engine for the URL in
  ``sqlalchemy.url`` or ``$LLMTRAIL_STORE_URL`` (default: the SQLite file ``llmtrail.db``).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from llmtrail.storage._base import store_url_from_environment
from llmtrail.storage._engine import create_engine, normalize_store_url
from llmtrail.storage._engine import write_engine as _write_engine
from llmtrail.storage._schema import metadata

config = context.config


def _store_url() -> str:
    return store_url_from_environment(config.get_main_option("sqlalchemy.url"))


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    context.configure(
        url=normalize_store_url(_store_url()),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(_store_url())
    try:
        async with _write_engine(engine).begin() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _run_offline()
elif (given := config.attributes.get("connection")) is not None:
    _run_on(given)
else:
    asyncio.run(_run_online())

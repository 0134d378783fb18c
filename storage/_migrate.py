"""Running the Alembic migrations from code, inside a running event loop.

Invariants:
- Alembic is configured in code (no ini file is read), and ``logging.config.fileConfig`` is
  never called, so the application's logging survives a migration.
- Migrations run on an ``AsyncConnection`` through ``run_sync``: no nested ``asyncio.run``,
  so they work from inside a service's loop.
- One migration at a time per store: on PostgreSQL a transaction-level advisory lock, on
  SQLite ``BEGIN IMMEDIATE``. Alembic reads the current revision after the lock is held, so
  two processes opening a new store together migrate it once.
- :func:`create_reader_role` (``llmtrail migrate --reader-role NAME``) runs exactly the
  statements of :func:`reader_role_sql`, which docs/sql.md prints: a LOGIN role with SELECT
  on the store's tables (now and future) and nothing else, read-only by default.
- :func:`ensure_schema` migrates a store without a schema (or at an older revision this
  llmtrail knows) and refuses one at an unknown revision with :class:`StoreSchemaError`.
- A damaged SQLite file, or one holding another program's tables, is refused with
  :class:`StoreCorruptError` (naming the file and the fix), never retried as an outage.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from llmtrail import migrations
from llmtrail._log import get_logger

from ._base import (
    StoreConfigError,
    StoreCorruptError,
    StoreError,
    StoreSchemaError,
    StoreUnavailableError,
    mask_url,
)
from ._engine import create_engine, is_postgresql, is_sqlite, write_engine
from ._failures import as_corruption

__all__ = [
    "SchemaState",
    "alembic_config",
    "check_schema",
    "create_reader_role",
    "ensure_schema",
    "head_revision",
    "migrate",
    "reader_role_sql",
    "schema_state",
]

_log = get_logger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
# pg_advisory_xact_lock key serialising migrations of one database across processes.
_MIGRATION_LOCK_KEY = 0x6C6C6D7472616D01
_VERSION_TABLE = "alembic_version"


# Connecting can fail outside SQLAlchemy's wrapping too (asyncpg raises OSError itself).
_UNAVAILABLE = (DBAPIError, OSError, TimeoutError)


def _reason(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return " ".join(str(cause).split()) or type(cause).__name__


def alembic_config() -> Config:
    """Alembic's configuration, built in code: no alembic.ini, hence no fileConfig."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@functools.lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this llmtrail knows (the schema a store must have)."""
    heads = _scripts().get_heads()
    if len(heads) != 1:  # pragma: no cover - a packaging bug, not a user error
        raise StoreSchemaError(f"migrations/ has {len(heads)} heads {heads}; expected one")
    return heads[0]


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


@dataclass(frozen=True, slots=True)
class SchemaState:
    """A store's Alembic revision (None without one) and whether it has an ``events`` table."""

    revision: str | None
    has_tables: bool
    other_tables: bool = False  # tables that are neither llmtrail's nor Alembic's

    @property
    def empty(self) -> bool:
        return self.revision is None and not self.has_tables


def _read_state(connection: Connection) -> SchemaState:
    # Read alembic_version directly: MigrationContext.configure() would log two INFO lines
    # on every service start.
    inspector = inspect(connection)
    revision = None
    if inspector.has_table(_VERSION_TABLE):
        revision = connection.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalar()
    names = set(inspector.get_table_names())
    return SchemaState(
        revision=revision,
        has_tables="events" in names,
        other_tables=bool(names - {_VERSION_TABLE, "events"}) and revision is None,
    )


def _unavailable(engine: AsyncEngine, doing: str, exc: BaseException) -> StoreError:
    corrupt = as_corruption(exc, engine.url)
    if corrupt is not None:
        return corrupt
    return StoreUnavailableError(
        f"cannot {doing} the event store {mask_url(engine.url)!r}: {_reason(exc)}; "
        "check that the database server is running and the URL is right"
    )


async def schema_state(engine: AsyncEngine) -> SchemaState:
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_read_state)
    except _UNAVAILABLE as exc:
        raise _unavailable(engine, "open", exc) from exc


# Alembic keeps its migration context in module globals (alembic.context, alembic.op), so two
# upgrades running at once in one process (each in its driver's thread) would trample each
# other. The database serialises processes; this lock serialises threads.
_ALEMBIC_LOCK = threading.Lock()


def _upgrade(connection: Connection, revision: str) -> None:
    with _ALEMBIC_LOCK:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


async def migrate(
    engine_or_url: AsyncEngine | str, revision: str = "head"
) -> tuple[str | None, str | None]:
    """Upgrade the store to ``revision``; return its revision before and after.

    Safe to call from a running event loop and from several processes at once.
    """
    if isinstance(engine_or_url, AsyncEngine):
        engine, owned = engine_or_url, False
    else:
        engine, owned = create_engine(engine_or_url), True
    try:
        if revision != "head" and not _known(revision):
            raise StoreSchemaError(
                f"unknown revision {revision!r}: use 'head' or one of "
                f"{sorted(s.revision for s in _scripts().walk_revisions())}"
            )
        async with write_engine(engine).begin() as connection:
            if is_postgresql(engine):
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            before = await connection.run_sync(_read_state)
            if before.revision is not None and not _known(before.revision):
                raise _unknown_revision(engine, before.revision)
            target = head_revision() if revision == "head" else revision
            if before.revision == target:
                return before.revision, before.revision
            await connection.run_sync(_upgrade, revision)
            after = await connection.run_sync(_read_state)
        if before.revision != after.revision:
            _log.info(
                "event store migrated",
                store=mask_url(engine.url),
                from_revision=before.revision,
                to_revision=after.revision,
            )
        return before.revision, after.revision
    except _UNAVAILABLE as exc:
        raise _unavailable(engine, "migrate", exc) from exc
    finally:
        if owned:
            await engine.dispose()


def _unknown_revision(engine: AsyncEngine, found: str) -> StoreSchemaError:
    return StoreSchemaError(
        f"the event store {mask_url(engine.url)!r} is at schema revision {found!r}, which this "
        f"llmtrail does not know (it expects {head_revision()!r}); the store was written by a "
        "newer llmtrail: upgrade llmtrail and run `llmtrail migrate --store URL`, "
        "or use another store"
    )


async def check_schema(engine: AsyncEngine) -> str:
    """The store's revision, for readers: raise :class:`StoreSchemaError` if it has none or
    one this llmtrail does not know. Never changes the store."""
    state = await schema_state(engine)
    if state.revision is None:
        raise StoreSchemaError(
            f"the event store {mask_url(engine.url)!r} has no schema (found revision None, "
            f"expected {head_revision()!r}): run `llmtrail migrate --store URL`"
        )
    if not _known(state.revision):
        raise _unknown_revision(engine, state.revision)
    return state.revision


async def ensure_schema(engine: AsyncEngine) -> None:
    """Make the store usable: migrate it if it has no schema or an older one.

    Raises :class:`StoreSchemaError` for a store at a revision this llmtrail does not know,
    and for a database that holds tables but no llmtrail schema.
    """
    state = await schema_state(engine)
    head = head_revision()
    if state.revision == head:
        return
    if state.revision is None and state.has_tables:
        raise StoreSchemaError(
            f"the database {mask_url(engine.url)!r} has an events table but no llmtrail schema "
            f"(found revision None, expected {head!r}): point --store at a new file or an "
            "empty database"
        )
    if state.revision is not None and not _known(state.revision):
        raise _unknown_revision(engine, state.revision)
    if state.other_tables and is_sqlite(engine):
        # A SQLite file is one application's: never add our tables to another program's.
        raise StoreCorruptError(
            f"the SQLite file {engine.url.database!r} holds another program's tables and no "
            "llmtrail schema: point store_url (or --store) at a new file or at an llmtrail store"
        )
    await migrate(engine)


_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def reader_role_sql(role: str, database: str) -> list[str]:
    """The statements that create (or re-grant) a least-privilege reader role for
    ``llmtrail sql``: it can log in and SELECT the store's tables, nothing more."""
    if not _ROLE_NAME.match(role):
        raise StoreConfigError(
            f"reader role name {role!r} is invalid: use lower-case letters, digits and _, "
            "starting with a letter or _ (e.g. llmtrail_reader)"
        )
    name = _quoted(role)
    return [
        f"DO $$ BEGIN\n  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN\n"
        f"    CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;\n"
        "  END IF;\nEND $$",
        f"GRANT CONNECT ON DATABASE {_quoted(database)} TO {name}",
        f"GRANT USAGE ON SCHEMA public TO {name}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {name}",
        f"ALTER ROLE {name} SET default_transaction_read_only = on",
    ]


async def create_reader_role(engine_or_url: AsyncEngine | str, role: str) -> None:
    """Create (or re-grant) the reader role ``role`` on a PostgreSQL store, after its schema."""
    if isinstance(engine_or_url, AsyncEngine):
        engine, owned = engine_or_url, False
    else:
        engine, owned = create_engine(engine_or_url), True
    try:
        if not is_postgresql(engine):
            raise StoreConfigError(
                f"--reader-role is for PostgreSQL stores; {mask_url(engine.url)!r} is SQLite, "
                "which `llmtrail sql` opens read-only anyway"
            )
        statements = reader_role_sql(role, engine.url.database or "")
        async with engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
        _log.info("reader role ready", store=mask_url(engine.url), role=role)
    except _UNAVAILABLE as exc:
        raise StoreUnavailableError(
            f"cannot create the reader role {role!r} on {mask_url(engine.url)!r}: "
            f"{_reason(exc)}; the migrating role needs CREATEROLE (or run the statements in "
            "docs/sql.md as an administrator)"
        ) from exc
    finally:
        if owned:
            await engine.dispose()

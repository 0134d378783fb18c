"""``llmtrail sql`` on PostgreSQL: the checks of :mod:`._readonly`, through asyncpg directly.

Invariants (the reasons are in :mod:`._readonly`):
- The role is checked before any statement text reaches the server.
- The statement is EXPLAINed, its names (text and plan) looked up in ``pg_proc``, then run in
  a READ ONLY transaction that is always rolled back; none of the checks executes it.
- asyncpg rather than SQLAlchemy, because cancellation must end with the statement cancelled
  on the server: the connection is dropped and ``pg_cancel_backend`` is sent from a second
  session (``client_connection_check_interval`` stops the query too if that fails).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from llmtrail._log import get_logger

from ._base import StoreError, StoreUnavailableError, mask_url
from ._readonly import (
    _LOCK_TIMEOUT_S,
    _PG_REFUSED,
    _UNICODE_IDENTIFIER,
    _WORD,
    HARMLESS_VOLATILE,
    PRIVILEGED_ROLES,
    ReadOnlyLimits,
    _refused,
    _timed_out,
    _too_many,
)

__all__ = ["run_postgresql"]

_log = get_logger(__name__)

_ROLE_QUERY = """
SELECT current_user AS name, r.rolsuper AS superuser, r.rolreplication AS replication,
       ARRAY(SELECT g FROM unnest($1::text[]) AS g
             WHERE CASE WHEN to_regrole(g) IS NULL THEN false
                        ELSE pg_has_role(current_user, g, 'MEMBER') END) AS memberships
FROM pg_roles AS r WHERE r.rolname = current_user
"""
_VOLATILE_QUERY = """
SELECT DISTINCT proname FROM pg_proc
WHERE provolatile = 'v' AND proname = ANY($1::text[]) ORDER BY proname
"""


def _connect_args(url: URL) -> dict[str, Any]:
    args: dict[str, Any] = url.translate_connect_args(username="user")
    for name in ("ssl", "sslmode"):
        if name in url.query:
            args["ssl"] = url.query[name]
    return args


async def run_postgresql(
    url: URL, statement: str, limits: ReadOnlyLimits
) -> tuple[list[str], list[list[Any]]]:
    timeout_ms = str(int(limits.timeout_s * 1000))
    settings = {
        "application_name": "llmtrail sql",
        "default_transaction_read_only": "on",
        "statement_timeout": timeout_ms,
        "lock_timeout": str(int(min(limits.timeout_s, _LOCK_TIMEOUT_S) * 1000)),
        "idle_in_transaction_session_timeout": timeout_ms,
        "client_connection_check_interval": "1000",
    }
    args = _connect_args(url)
    try:
        conn = await asyncpg.connect(
            **args, server_settings=settings, timeout=min(limits.timeout_s, 30.0)
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StoreUnavailableError(
            f"cannot open the event store {mask_url(url)!r}: {reason}; check that the "
            "database server is running and the URL is right"
        ) from None
    pid = conn.get_server_pid()
    try:
        await _check_role(conn, limits.allow_privileged_role)
        return await _query(conn, statement, limits)
    except asyncio.CancelledError:
        conn.terminate()
        await _cancel_backend(args, pid)
        raise
    except asyncpg.PostgresError as exc:
        raise _translate(exc, limits) from None
    finally:
        if not conn.is_closed():
            await conn.close(timeout=5.0)


async def _check_role(conn: asyncpg.Connection, allowed: bool) -> None:
    role = await conn.fetchrow(_ROLE_QUERY, list(PRIVILEGED_ROLES))
    if role is None or allowed:
        return
    powers = [
        *(["SUPERUSER"] if role["superuser"] else []),
        *(["REPLICATION"] if role["replication"] else []),
        *role["memberships"],
    ]
    if powers:
        raise _refused(
            f"the role {role['name']!r} ({', '.join(powers)}) can reach server files, "
            "programs or other sessions: connect as a reader role (create one "
            "with `llmtrail migrate --store URL --reader-role llmtrail_reader`, see "
            "docs/sql.md), or pass --allow-privileged-role to accept the risk"
        )


async def _query(
    conn: asyncpg.Connection, statement: str, limits: ReadOnlyLimits
) -> tuple[list[str], list[list[Any]]]:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    if _UNICODE_IDENTIFIER.search(statement):
        raise _refused('a U&"..." identifier can hide a function\'s name: spell it plainly')
    transaction = conn.transaction(readonly=True)
    await transaction.start()
    try:
        plan = await _explain(conn, statement)
        names = {w.lower() for w in _WORD.findall(statement)}
        names |= {w.lower() for w in _WORD.findall(plan)}
        volatile = await conn.fetch(_VOLATILE_QUERY, sorted(names - HARMLESS_VOLATILE))
        if volatile:
            listed = ", ".join(row["proname"] for row in volatile)
            raise _refused(
                f"it names the volatile function(s) {listed}, which can lock, signal, read "
                "files or change state outside the query"
            )
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(
                kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        prepared = await conn.prepare(statement)
        header = [attribute.name for attribute in prepared.get_attributes()]
        rows: list[list[Any]] = []
        if not header:
            await prepared.fetch()
            return [], []
        async for record in prepared.cursor(prefetch=1_000):
            rows.append(list(record))
            if len(rows) > limits.max_rows:
                raise _too_many(limits.max_rows)
        return header, rows
    finally:
        task = asyncio.current_task()
        # Cancelled: the connection is dropped instead (run_postgresql), which ends the
        # transaction on the server; a ROLLBACK would queue behind the cancelled statement.
        if not conn.is_closed() and not (task is not None and task.cancelling()):
            await transaction.rollback()


async def _explain(conn: asyncpg.Connection, statement: str) -> str:
    """The statement's plan as text; a statement PostgreSQL cannot EXPLAIN is refused."""
    try:
        async with conn.transaction():  # a savepoint: the transaction survives a failure
            plan = await conn.fetchval("EXPLAIN (VERBOSE, FORMAT JSON)\n" + statement)
            return plan if isinstance(plan, str) else json.dumps(plan)
    except asyncpg.PostgresSyntaxError as explained:
        if "multiple commands" in str(explained):
            raise _refused("give a single statement", str(explained)) from None
    # EXPLAIN could not parse it: a plain syntax error (reported as such), or a statement that
    # is not a query. Parsing it alone (a prepare, which executes nothing) tells which.
    await conn.prepare(statement)
    raise _refused(
        "only a query that PostgreSQL can EXPLAIN is run (SELECT, VALUES, TABLE, WITH ... "
        "SELECT); COPY, DO, CALL, SET, LOCK and other commands are not"
    )


def _translate(exc: asyncpg.PostgresError, limits: ReadOnlyLimits) -> StoreError:
    message = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    state = getattr(exc, "sqlstate", None)
    if state in _PG_REFUSED:
        return _refused(_PG_REFUSED[state], message)
    if "multiple commands" in message:
        return _refused("give a single statement", message)
    if isinstance(exc, asyncpg.QueryCanceledError):
        return _timed_out(limits.timeout_s)
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return StoreError(
            f"SQL error: {message} (a lock was held longer than {_LOCK_TIMEOUT_S:g}s by a "
            "migration or another session): try again"
        )
    return StoreError(f"SQL error: {message}")


async def _cancel_backend(args: dict[str, Any], pid: int) -> None:
    """Cancel the running statement of backend ``pid`` (one's own session: no privilege)."""
    try:
        conn = await asyncpg.connect(**args, timeout=5.0)
        try:
            await conn.fetchval("SELECT pg_cancel_backend($1)", pid, timeout=5.0)
        finally:
            await conn.close(timeout=5.0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The server still drops the statement: client_connection_check_interval sees the
        # closed connection within a second.
        _log.warning("could not cancel the statement on the server", pid=pid, error=str(exc))

"""Hostile input for ``llmtrail sql``: every statement class that could write, reach a file,
load code, signal or lock out another session, on both backends.

Each statement runs through the real command line (in process, in a worker thread so a
concurrent session lives in the test's loop) and must be refused with exit 2 and one line on
stderr, print nothing, create no file (in the store's directory and in a world-writable target
directory the statements aim at), and leave other sessions as they were: on PostgreSQL a
witness session keeps its backend and can take the writers' append lock at once, no
replication slot exists; on SQLite a writer can still take the write lock. PostgreSQL runs the
suite three times: as a superuser (refused by the role check), as a superuser with
``--allow-privileged-role`` (the statement checks alone), and as the reader role of
``llmtrail migrate --reader-role``. Timeouts and Ctrl-C are tested at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from llmtrail.pipeline._cli import build_parser
from llmtrail.storage._inserter import _PG_APPEND_LOCK_KEY
from llmtrail.storage._projections import run_projections
from llmtrail.testing.fixtures import PG_ADMIN_DSN
from tests.storage.projection_events import LogStore, sample_log

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

KEY = _PG_APPEND_LOCK_KEY

# {dir}: a world-writable directory (the PostgreSQL server runs as another OS user).
SQLITE_HOSTILE = {
    "insert": "INSERT INTO events (event_id, call_id, seq, type, occurred_at) "
    "VALUES ('x', 'x', 0, 'sent', '2025-01-01')",
    "replace": "REPLACE INTO calls (call_id) VALUES ('x')",
    "update": "UPDATE calls SET outcome = 'succeeded'",
    "delete": "DELETE FROM calls",
    "cte-delete": "WITH d AS (SELECT call_id FROM calls) DELETE FROM calls "
    "WHERE call_id IN (SELECT call_id FROM d)",
    "drop": "DROP TABLE events",
    "create-table": "CREATE TABLE x (a)",
    "create-temp-table": "CREATE TEMP TABLE x (a)",
    "create-index": "CREATE INDEX x ON events (seq)",
    "create-view": "CREATE VIEW x AS SELECT 1",
    "create-trigger": "CREATE TEMP TRIGGER x AFTER INSERT ON events BEGIN SELECT 1; END",
    "create-virtual": "CREATE VIRTUAL TABLE x USING fts5(a)",
    "alter": "ALTER TABLE events ADD COLUMN x",
    "stacked": "SELECT 1; DROP TABLE events",
    "attach-file": "ATTACH '{dir}/attached.db' AS x",
    "attach-memory": "ATTACH ':memory:' AS x",
    "detach": "DETACH main",
    "vacuum": "VACUUM",
    "vacuum-into": "VACUUM INTO '{dir}/vacuumed.db'",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "begin": "BEGIN",
    "begin-immediate": "BEGIN IMMEDIATE",
    "savepoint": "SAVEPOINT x",
    "commit": "COMMIT",
    "pragma-journal-mode": "PRAGMA journal_mode = DELETE",
    "pragma-user-version": "PRAGMA user_version = 7",
    "pragma-writable-schema": "PRAGMA writable_schema = ON",
    "pragma-query-only": "PRAGMA query_only = OFF",
    "pragma-locking-mode": "PRAGMA locking_mode = EXCLUSIVE",
    "pragma-temp-store-directory": "PRAGMA temp_store_directory = '{dir}'",
    "pragma-wal-checkpoint": "PRAGMA wal_checkpoint(TRUNCATE)",
    "pragma-optimize": "PRAGMA optimize",
    "pragma-hard-heap-limit": "PRAGMA hard_heap_limit = 1",
    "pragma-mmap-size": "PRAGMA mmap_size = 1000000000",
    "insert-or-ignore": "INSERT OR IGNORE INTO calls (call_id) VALUES ('x')",
    "upsert": "INSERT INTO calls (call_id) VALUES ('x') ON CONFLICT DO NOTHING",
    "cte-insert": "WITH x AS (SELECT 1) INSERT INTO calls (call_id) SELECT 'x' FROM x",
    "delete-returning": "DELETE FROM calls RETURNING *",
    "drop-index": "DROP INDEX ix_calls_outcome",
    "create-temp-view": "CREATE TEMP VIEW x AS SELECT 1",
    "attach-uri": "ATTACH 'file:{dir}/uri.db?mode=rwc' AS x",
    "vacuum-schema": "VACUUM main",
    "reindex-table": "REINDEX events",
    "analyze-table": "ANALYZE events",
    "rollback": "ROLLBACK",
    "release": "RELEASE x",
    "end": "END",
    "pragma-synchronous": "PRAGMA synchronous = OFF",
    "pragma-journal-size-limit": "PRAGMA journal_size_limit = 0",
    "pragma-foreign-keys": "PRAGMA foreign_keys = OFF",
    "pragma-incremental-vacuum": "PRAGMA incremental_vacuum",
    "pragma-secure-delete": "PRAGMA secure_delete = ON",
    "pragma-soft-heap-limit": "PRAGMA soft_heap_limit = 1",
    "pragma-schema-journal-mode": "PRAGMA main.journal_mode = MEMORY",
    "load-extension": "SELECT load_extension('{dir}/evil')",
    "fts3-tokenizer": "SELECT fts3_tokenizer('simple')",
}

PG_HOSTILE = {
    "insert": "INSERT INTO projection_checkpoints (name, position) VALUES ('x', 0)",
    "update": "UPDATE calls SET outcome = 'succeeded'",
    "delete": "DELETE FROM calls",
    "cte-delete": "WITH g AS (DELETE FROM events RETURNING 1) SELECT count(*) FROM g",
    "truncate": "TRUNCATE events",
    "drop": "DROP TABLE events",
    "create-table": "CREATE TABLE x (a int)",
    "alter": "ALTER TABLE events ADD COLUMN x int",
    "select-into": "SELECT * INTO TEMP x FROM events",
    "select-for-update": "SELECT * FROM calls FOR UPDATE",
    "stacked": "SELECT 1; DROP TABLE events",
    "copy-to-program": "COPY (SELECT 1) TO PROGRAM 'touch {dir}/program-ran'",
    "copy-to-file": "COPY (SELECT 1) TO '{dir}/copied'",
    "copy-from-file": "COPY projection_checkpoints FROM '/etc/hostname'",
    "read-file": "SELECT pg_read_file('/etc/hostname')",
    "read-binary-file": "SELECT pg_read_binary_file('/etc/hostname')",
    "ls-dir": "SELECT pg_ls_dir('.')",
    "stat-file": "SELECT pg_stat_file('postgresql.conf')",
    "lo-import": "SELECT lo_import('/etc/hostname')",
    "lo-export": "SELECT lo_export(0, '{dir}/exported')",
    "physical-slot": "SELECT pg_create_physical_replication_slot('llmtrail_hostile')",
    "logical-slot": "SELECT pg_create_logical_replication_slot('llmtrail_hostile', 'pgoutput')",
    "terminate-backend": "SELECT pg_terminate_backend({witness})",
    "cancel-backend": "SELECT pg_cancel_backend({witness})",
    "reload-conf": "SELECT pg_reload_conf()",
    "rotate-logfile": "SELECT pg_rotate_logfile()",
    "switch-wal": "SELECT pg_switch_wal()",
    "checkpoint": "CHECKPOINT",
    "stat-reset": "SELECT pg_stat_reset()",
    "emit-wal-message": "SELECT pg_logical_emit_message(true, 'x', 'y')",
    "advisory-xact-lock": f"SELECT pg_advisory_xact_lock({KEY}), pg_sleep(15)",
    "advisory-lock": f"SELECT pg_advisory_lock({KEY})",
    "try-advisory-lock": f"SELECT pg_try_advisory_lock({KEY})",
    "advisory-in-limit": f"SELECT 1 LIMIT pg_try_advisory_xact_lock({KEY})::int",
    "advisory-in-values": f"SELECT * FROM (VALUES (pg_try_advisory_lock({KEY}))) AS v(x)",
    "advisory-quoted": f'SELECT "pg_advisory_lock"({KEY})',
    "advisory-unicode-escape": f'SELECT U&"pg_adv\\0069sory_lock"({KEY})',
    "advisory-in-do": f"DO $$ BEGIN PERFORM pg_advisory_lock({KEY}); END $$",
    "advisory-in-cursor": f"DECLARE c CURSOR FOR SELECT pg_advisory_lock({KEY})",
    "dynamic-sql": f"SELECT query_to_xml('SELECT pg_advisory_lock({KEY})', true, true, '')",
    "set-config": "SELECT set_config('default_transaction_read_only', 'off', false)",
    "set": "SET default_transaction_read_only = off",
    "set-role": "SET ROLE postgres",
    "reset": "RESET ALL",
    "lock-table": "LOCK TABLE events IN ACCESS EXCLUSIVE MODE",
    "vacuum": "VACUUM events",
    "analyze": "ANALYZE events",
    "reindex": "REINDEX TABLE events",
    "listen": "LISTEN llmtrail",
    "notify": "NOTIFY llmtrail, 'x'",
    "pg-notify": "SELECT pg_notify('llmtrail', 'x')",
    "prepare": "PREPARE p AS DELETE FROM events",
    "nextval": "SELECT nextval(pg_get_serial_sequence('events', 'position'))",
    "alter-system": "ALTER SYSTEM SET work_mem = '1GB'",
    "explain-analyze": "EXPLAIN ANALYZE DELETE FROM events",
    "create-extension": "CREATE EXTENSION IF NOT EXISTS dblink",
}


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def refused_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("llmtrail sql: error: refused:"), lines[0]
    return lines[0]


@pytest.fixture
def target_dir() -> Iterator[Path]:
    """World-writable, so a statement the server ran as its own OS user could write here."""
    path = Path(tempfile.mkdtemp(prefix="llmtrail-hostile-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listing(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


async def fill(url: str) -> None:
    store = await LogStore.open(url)
    try:
        await store.append(sample_log())
        await run_projections(store.engine)
    finally:
        await store.aclose()


# -- SQLite ---------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Path:
    # A "#" in the path: the URI must name this file, not "store " opened read-write.
    directory = tmp_path / "dir #1"
    directory.mkdir()
    path = directory / "store #1.db"
    asyncio.run(fill(f"sqlite+aiosqlite:///{path}"))
    return path


def sqlite_counts(path: Path) -> tuple[int, int, int]:
    connection = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
    try:
        return connection.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM calls), "
            "(SELECT count(*) FROM sqlite_master)"
        ).fetchone()
    finally:
        connection.close()


@pytest.mark.parametrize("name", sorted(SQLITE_HOSTILE))
def test_sqlite_refuses_every_hostile_statement(
    name: str, sqlite_store: Path, target_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = SQLITE_HOSTILE[name].format(dir=target_dir)
    before_files = listing(sqlite_store.parent, target_dir)
    before = sqlite_counts(sqlite_store)
    code = run_cli(["sql", "--store", f"sqlite:///{sqlite_store}", "--timeout", "5", statement])
    line = refused_line(capsys)
    assert code == 2, line
    # The store's own -wal/-shm may appear (any reader of a WAL database makes them); nothing
    # else, and they are private like the store.
    created = listing(sqlite_store.parent, target_dir) - before_files
    sidecars = {f"{sqlite_store}-wal", f"{sqlite_store}-shm"}
    assert created <= sidecars, created
    for sidecar in created:
        assert Path(sidecar).stat().st_mode & 0o777 == 0o600
    assert not (sqlite_store.parent / "store ").exists()
    assert sqlite_counts(sqlite_store) == before
    # Another session can still write: no lock, no changed journal mode left behind.
    writer = sqlite3.connect(sqlite_store, timeout=0.5, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        writer.execute("ROLLBACK")
    finally:
        writer.close()


def test_sqlite_store_path_with_a_hash_is_read(
    sqlite_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = "SELECT count(*) AS n FROM events"
    url = f"sqlite:///{sqlite_store}"
    assert run_cli(["sql", "--store", url, statement, "--format", "csv"]) == 0
    assert capsys.readouterr().out == f"n\n{len(sample_log())}\n"
    assert sorted(p.name for p in sqlite_store.parent.iterdir()) <= sorted(
        [sqlite_store.name, f"{sqlite_store.name}-wal", f"{sqlite_store.name}-shm"]
    )


def test_sqlite_reads_that_need_pragmas_and_table_functions_still_work(
    sqlite_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{sqlite_store}"
    for statement in (
        "SELECT name FROM pragma_table_info('calls') WHERE name = 'outcome'",
        "PRAGMA table_info(calls)",
        "PRAGMA user_version",
        "SELECT value FROM json_each('[1]')",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SELECT count(*) FROM r",
    ):
        assert run_cli(["sql", "--store", url, statement, "--format", "csv"]) == 0, statement
        assert capsys.readouterr().out.count("\n") >= 2, statement


def test_sqlite_timeout_stops_a_runaway_recursive_query(
    sqlite_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r"
    started = time.monotonic()
    code = run_cli(["sql", "--store", f"sqlite:///{sqlite_store}", "--timeout", "1", statement])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1, err
    assert "ran longer than --timeout 1s" in err
    assert elapsed < 15  # hang detection only


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[dict[str, str]]:
    """A populated store, its superuser URL and the URL of its reader role."""
    asyncio.run(fill(pg_url))
    database = pg_url.rsplit("/", 1)[1]
    role = f"reader_{database[-12:]}"
    assert run_cli(["migrate", "--store", pg_url, "--reader-role", role]) == 0
    try:
        yield {
            "superuser": pg_url,
            "reader": pg_url.replace("postgres@", f"{role}@", 1),
            "role": role,
        }
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
            try:
                await conn.execute(f'DROP OWNED BY "{role}"')
            finally:
                await conn.close()
            admin = await asyncpg.connect(PG_ADMIN_DSN)
            try:
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
            finally:
                await admin.close()

        asyncio.run(drop())


async def fetch_row(url: str, query: str) -> tuple[object, ...]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return tuple(await conn.fetchrow(query))
    finally:
        await conn.close()


async def pg_state(url: str) -> tuple[object, ...]:
    return await fetch_row(
        url,
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM calls), "
        "(SELECT count(*) FROM projection_checkpoints), "
        "(SELECT count(*) FROM pg_replication_slots), "
        "(SELECT count(*) FROM pg_largeobject_metadata), "
        "(SELECT count(*) FROM information_schema.tables "
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema'))",
    )


MODES = ["superuser", "superuser-allowed", "reader"]


@pytest.mark.parametrize("mode", MODES)
async def test_postgresql_refuses_every_hostile_statement(
    mode: str,
    pg_store: dict[str, str],
    target_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = pg_store["reader" if mode == "reader" else "superuser"]
    options = ["--allow-privileged-role"] if mode == "superuser-allowed" else []
    witness = await asyncpg.connect(
        pg_store["superuser"].replace("postgresql+asyncpg", "postgresql")
    )
    try:
        pid = await witness.fetchval("SELECT pg_backend_pid()")
        before = await pg_state(pg_store["superuser"])
        failures: dict[str, str] = {}
        for name, template in sorted(PG_HOSTILE.items()):
            statement = template.format(dir=target_dir, witness=pid)
            files = listing(target_dir)
            argv = ["sql", "--store", url, "--timeout", "5", *options, statement]
            started = time.monotonic()
            code = await asyncio.to_thread(run_cli, argv)
            elapsed = time.monotonic() - started
            captured = capsys.readouterr()
            lines = captured.err.splitlines()
            ok = (
                code == 2
                and captured.out == ""
                and len(lines) == 1
                and lines[0].startswith("llmtrail sql: error: refused:")
            )
            if not ok:
                failures[name] = f"exit {code}: {captured.err.strip()[:300]}"
            if listing(target_dir) != files:
                failures[name] = f"created {sorted(listing(target_dir) - files)}"
            # The witness session is untouched and the writers' lock is free at once.
            async with witness.transaction():
                assert await witness.fetchval("SELECT pg_backend_pid()") == pid, name
                free = await witness.fetchval("SELECT pg_try_advisory_xact_lock($1)", KEY)
            if not free:
                failures[name] = "the writers' append lock was held"
            if elapsed > 10:
                failures[name] = f"took {elapsed:.1f}s"
        after = await pg_state(pg_store["superuser"])
    finally:
        await witness.close()
    print(f"\nPostgreSQL as {mode}: refused {len(PG_HOSTILE) - len(failures)} of {len(PG_HOSTILE)}")
    assert failures == {}
    assert after == before


async def test_postgresql_reader_role_reads_and_timeouts_are_honoured(
    pg_store: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_store["reader"]
    argv = ["sql", "--store", url, "SELECT count(*) AS n FROM events", "--format", "csv"]
    assert await asyncio.to_thread(run_cli, argv) == 0
    assert capsys.readouterr().out == f"n\n{len(sample_log())}\n"
    for statement in (
        "SELECT pg_sleep(30)",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    ):
        started = time.monotonic()
        code = await asyncio.to_thread(
            run_cli, ["sql", "--store", url, "--timeout", "1", statement]
        )
        elapsed = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 1, err
        assert "ran longer than --timeout 1s" in err
        assert elapsed < 15  # hang detection only


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------


_MAIN = "import sys; from llmtrail.pipeline._cli import main; sys.exit(main(sys.argv[1:]))"


def interrupt(
    url: str,
    statement: str,
    sig: signal.Signals,
    running: Callable[[], bool],
    pids: list[int] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Start ``llmtrail sql``, wait until ``running()`` says the statement runs, signal it."""
    process = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "sql", "--store", url, statement],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if pids is not None:
        pids.append(process.pid)
    deadline = time.monotonic() + 60
    while not running():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the statement never started"
        time.sleep(0.05)  # polling the outside world (the server, the file system)
    time.sleep(0.2)
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


async def active_sql_sessions(url: str) -> int:
    (count,) = await fetch_row(
        url,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'llmtrail sql' AND state = 'active'",
    )
    return int(str(count))


def test_the_server_drops_the_statement_of_a_client_that_died(pg_store: dict[str, str]) -> None:
    """SIGKILL: no handler runs; client_connection_check_interval ends the query."""

    def running() -> bool:
        return asyncio.run(active_sql_sessions(pg_store["superuser"])) > 0

    done = interrupt(pg_store["reader"], "SELECT pg_sleep(120)", signal.SIGKILL, running)
    assert done.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the server
    assert not running(), "the statement outlived its client"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_cancels_the_postgresql_statement_on_the_server(
    pg_store: dict[str, str], sig: signal.Signals
) -> None:
    def running() -> bool:
        return asyncio.run(active_sql_sessions(pg_store["superuser"])) > 0

    done = interrupt(pg_store["reader"], "SELECT pg_sleep(60)", sig, running)
    assert done.returncode == 128 + sig, done.stderr
    assert "interrupted; the statement was cancelled" in done.stderr
    assert "Traceback" not in done.stderr
    deadline = time.monotonic() + 5
    while asyncio.run(active_sql_sessions(pg_store["superuser"])) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the server, not waiting for a condition of ours
    assert asyncio.run(active_sql_sessions(pg_store["superuser"])) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_a_runaway_sqlite_statement(sqlite_store: Path, sig: signal.Signals) -> None:
    statement = (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    )
    pids: list[int] = []

    def running() -> bool:  # the process has the store open (Linux: /proc/PID/fd)
        fds = Path(f"/proc/{pids[0]}/fd")
        try:
            return any(os.readlink(fd) == str(sqlite_store) for fd in fds.iterdir())
        except OSError:
            return False

    done = interrupt(f"sqlite:///{sqlite_store}", statement, sig, running, pids)
    assert done.returncode == 128 + sig, done.stderr
    assert "interrupted; the statement was cancelled" in done.stderr

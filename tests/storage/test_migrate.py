"""Migrations: run from a running loop, automatic on first use, refusal of unknown schemas,
logging left alone, private SQLite files."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from llmtrail import migrations
from llmtrail.storage import (
    EventStore,
    StoreConfigError,
    StoreSchemaError,
    create_engine,
    ensure_schema,
    head_revision,
    migrate,
    open_store_sink,
)
from tests.storage.test_store_contract import call_events


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE alembic_version SET version_num = :r"), {"r": revision}
            )
    finally:
        await engine.dispose()


async def test_migrate_runs_inside_a_running_event_loop(store_url: str) -> None:
    asyncio.get_running_loop()  # we are in one: no nested asyncio.run may happen below

    first = await migrate(store_url)
    again = await migrate(store_url)

    assert first == (None, head_revision())
    assert again == (head_revision(), head_revision())
    assert {"events", "alembic_version"} <= await _tables(store_url)


async def test_a_new_store_is_migrated_when_a_writer_starts(store_url: str) -> None:
    writer = open_store_sink(store_url)
    await writer.start()
    writer.emit(call_events("first")[0])
    await writer.aclose()

    assert "events" in await _tables(store_url)
    async with await EventStore.open(store_url) as store:
        assert len(await store.read()) == 1


async def test_a_store_at_an_older_known_revision_is_upgraded_on_first_use(
    sqlite_url: str,
) -> None:
    assert await migrate(sqlite_url, "0001_events") == (None, "0001_events")
    if head_revision() == "0001_events":  # pragma: no cover - nothing newer to upgrade to
        pytest.skip("0001_events is the only revision")

    writer = open_store_sink(sqlite_url)
    await writer.start()
    await writer.aclose()

    assert (await migrate(sqlite_url))[0] == head_revision()


async def test_an_unknown_target_revision_is_refused(sqlite_url: str) -> None:
    with pytest.raises(StoreSchemaError, match="unknown revision 'bogus'"):
        await migrate(sqlite_url, "bogus")


async def test_concurrent_first_uses_migrate_the_store_once(store_url: str) -> None:
    engines = [create_engine(store_url) for _ in range(3)]
    try:
        await asyncio.gather(*(ensure_schema(engine) for engine in engines))
    finally:
        for engine in engines:
            await engine.dispose()
    assert "events" in await _tables(store_url)
    assert (await migrate(store_url))[0] == head_revision()


async def test_a_store_at_an_unknown_revision_is_refused_with_both_revisions_and_the_fix(
    store_url: str,
) -> None:
    await migrate(store_url)
    await _set_revision(store_url, "9999_from_the_future")

    with pytest.raises(StoreSchemaError) as info:
        await open_store_sink(store_url).start()

    message = str(info.value)
    assert "9999_from_the_future" in message
    assert head_revision() in message
    assert "llmtrail migrate" in message
    with pytest.raises(StoreSchemaError, match="9999_from_the_future"):
        await EventStore.open(store_url)


async def test_an_events_table_without_a_schema_version_is_refused(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE events (id INTEGER)"))
    await engine.dispose()

    with pytest.raises(StoreSchemaError, match="no llmtrail schema"):
        await open_store_sink(sqlite_url).start()


async def test_a_reader_never_creates_or_migrates_a_store(sqlite_url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="no event store"):
        await EventStore.open(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()

    create_engine(sqlite_url)  # creates the empty file, as a writer would
    with pytest.raises(StoreSchemaError, match="llmtrail migrate"):
        await EventStore.open(sqlite_url)


async def test_migrations_leave_the_applications_logging_alone(store_url: str) -> None:
    app_logger = logging.getLogger("myapp.orders")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    root_handlers = list(logging.getLogger().handlers)
    try:
        await migrate(store_url)
        writer = open_store_sink(store_url)
        await writer.start()
        await writer.aclose()
        app_logger.info("order placed")
    finally:
        app_logger.removeHandler(handler)

    assert not app_logger.disabled
    assert [r.getMessage() for r in records] == ["order placed"]
    assert logging.getLogger().handlers == root_handlers
    assert not any(logging.getLogger(name).disabled for name in logging.root.manager.loggerDict)


async def test_a_sqlite_store_and_its_wal_files_are_private_to_the_owner(sqlite_url: str) -> None:
    writer = open_store_sink(sqlite_url)
    await writer.start()
    for event in call_events("private"):
        writer.emit(event)
    await writer.flush()
    path = Path(make_url(sqlite_url).database or "")

    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in path.parent.iterdir()
        if p.name.startswith(path.name)
    }
    await writer.aclose()

    assert modes[path.name] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes
    assert f"{path.name}-wal" in modes  # the WAL existed while the writer was open


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not the events you are looking for\n")
    with pytest.raises(StoreConfigError, match="not a SQLite database"):
        await open_store_sink(f"sqlite:///{path}").start()
    with pytest.raises(StoreConfigError, match="not a SQLite database"):
        await EventStore.open(f"sqlite:///{path}")


async def test_a_store_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="does not exist"):
        await open_store_sink(f"sqlite:///{tmp_path / 'nope' / 'x.db'}").start()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
async def test_an_unreadable_store_is_refused(tmp_path: Path) -> None:  # pragma: no cover
    path = tmp_path / "locked.db"
    path.write_bytes(b"")
    path.chmod(0)
    with pytest.raises(StoreConfigError, match="not readable"):
        await open_store_sink(f"sqlite:///{path}").start()


@pytest.mark.slow
def test_the_alembic_command_works_with_the_shipped_ini(sqlite_url: str) -> None:
    ini = Path(migrations.__file__).with_name("alembic.ini")
    alembic = Path(sys.executable).with_name("alembic")
    env = {**os.environ, "LLMTRAIL_STORE_URL": sqlite_url}

    upgraded = subprocess.run(
        [str(alembic), "-c", str(ini), "upgrade", "head"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    current = subprocess.run(
        [str(alembic), "-c", str(ini), "current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert upgraded.returncode == 0, upgraded.stderr
    assert current.returncode == 0, current.stderr
    assert head_revision() in current.stdout

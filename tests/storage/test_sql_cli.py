"""``llmtrail sql``: read-only by construction, on both backends (the hostile-input suite is
test_sql_hostile.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from pathlib import Path

import asyncpg
import pytest

from llmtrail.pipeline._cli import build_parser
from llmtrail.storage._migrate import reader_role_sql
from llmtrail.storage._projections import run_projections
from tests.storage.projection_events import LogStore, sample_log

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"


def main(argv: list[str]) -> int:
    """``llmtrail ARGV`` in-process, without the CLI's global logging setup (which would bind
    the log handlers to this test's captured stderr)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def populated(store_url):
    async def fill():
        store = await LogStore.open(store_url)
        try:
            await store.append(sample_log())
            await run_projections(store.engine)
        finally:
            await store.aclose()

    asyncio.run(fill())
    return store_url


def sql(url, statement, *options):
    # The test stores are reached as the superuser `postgres`; the role check itself is tested
    # in test_sql_hostile.py.
    if url.startswith("postgresql"):
        options = ("--allow-privileged-role", *options)
    return main(["sql", "--store", url, statement, *options])


def counts(url, capsys):
    capsys.readouterr()
    assert (
        sql(
            url,
            "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM calls) AS calls",
            "--format",
            "json",
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)


def error_line(capsys, prefix="llmtrail sql: error:"):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def test_select_returns_rows_as_json(populated, capsys):
    assert (
        sql(populated, "SELECT call_id, outcome FROM calls ORDER BY call_id", "--format", "json")
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert {r["call_id"]: r["outcome"] for r in rows} == {
        "c-cancel": "cancelled",
        "c-died": "interrupted",
        "c-fail": "failed",
        "c-invalid": "failed",
        "c-ok-1": "succeeded",
        "c-ok-2": "succeeded",
        "c-retry": "succeeded",
        "c-unpriced": "succeeded",
    }


def test_select_returns_rows_as_csv_and_table(populated, capsys):
    assert (
        sql(populated, "SELECT model, calls FROM usage_daily ORDER BY model", "--format", "csv")
        == 0
    )
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [
        ["model", "calls"],
        ["gpt-4o", "1"],
        ["gpt-4o-mini", "6"],
        ["my-local-llama", "1"],
    ]
    assert sql(populated, "SELECT count(*) AS n FROM events") == 0
    out = capsys.readouterr().out
    assert "n" in out and str(len(sample_log())) in out


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO events (event_id, call_id, seq, type, occurred_at) "
        "VALUES ('x', 'x', 0, 'sent', '2025-01-01 00:00:00')",
        "UPDATE calls SET outcome = 'succeeded'",
        "DELETE FROM calls",
        "DROP TABLE events",
        "SELECT 1; DROP TABLE events",
        "WITH doomed AS (SELECT call_id FROM calls) DELETE FROM calls "
        "WHERE call_id IN (SELECT call_id FROM doomed)",
    ],
    ids=["insert", "update", "delete", "drop", "stacked", "cte-delete"],
)
def test_a_statement_that_writes_is_refused_and_changes_nothing(populated, capsys, statement):
    before = counts(populated, capsys)
    assert sql(populated, statement) == 2
    line = error_line(capsys)
    assert "refused: llmtrail sql is read-only" in line
    assert counts(populated, capsys) == before


def test_a_write_hidden_in_a_select_is_refused_on_postgresql(pg_url, capsys):
    async def fill():
        store = await LogStore.open(pg_url)
        await store.append(sample_log())
        await store.aclose()

    asyncio.run(fill())
    before = counts(pg_url, capsys)
    statement = "WITH gone AS (DELETE FROM events RETURNING 1) SELECT count(*) FROM gone"
    assert sql(pg_url, statement) == 2
    assert "read-only" in error_line(capsys)
    assert counts(pg_url, capsys) == before


def test_an_sql_error_is_one_line_and_exit_1(populated, capsys):
    assert sql(populated, "SELECT * FROM no_such_table") == 1
    line = error_line(capsys)
    assert "SQL error" in line and "no_such_table" in line


def test_a_missing_sqlite_store_is_a_usage_error_and_is_not_created(tmp_path, capsys):
    path = tmp_path / "absent.db"
    assert sql(f"sqlite+aiosqlite:///{path}", "SELECT 1") == 2
    assert "no event store" in error_line(capsys)
    assert not path.exists()


def test_an_empty_statement_is_a_usage_error(populated, capsys):
    assert sql(populated, "   ") == 2
    assert "empty" in error_line(capsys)


def test_a_superuser_is_refused_unless_allowed(pg_url, capsys):
    assert main(["migrate", "--store", pg_url]) == 0
    capsys.readouterr()
    assert main(["sql", "--store", pg_url, "SELECT 1 AS one"]) == 2
    line = error_line(capsys)
    assert "'postgres' (SUPERUSER" in line and "--reader-role" in line
    assert sql(pg_url, "SELECT 1 AS one", "--format", "csv") == 0
    assert capsys.readouterr().out == "one\n1\n"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_timeout_is_a_usage_error(populated, capsys, value):
    assert sql(populated, "SELECT 1", "--timeout", value) == 2
    assert "--timeout" in error_line(capsys)


def test_max_rows_is_an_error_not_a_silent_cut(populated, capsys):
    assert sql(populated, "SELECT * FROM events", "--max-rows", "3") == 1
    assert "more than --max-rows 3 rows" in error_line(capsys)


def documented_reader_role() -> tuple[str, str, str]:
    """(role, database, statements) of the reader-role block of docs/sql.md."""
    found = re.search(r"```sql\n-- reader-role: (\S+) (\S+)\n(.*?)```", DOC.read_text(), re.S)
    assert found is not None, "docs/sql.md lost its reader-role snippet"
    return found.group(1), found.group(2), found.group(3)


def test_the_documented_reader_role_is_what_migrate_creates():
    role, database, statements = documented_reader_role()
    assert statements == ";\n".join(reader_role_sql(role, database)) + ";\n"


def test_the_documented_reader_role_reads_and_nothing_more(pg_url, capsys):
    """The docs' statements, run as an administrator would (psql: one script), give a role
    that `llmtrail sql` accepts, that reads the store, and that cannot write."""
    assert main(["migrate", "--store", pg_url]) == 0
    role, database, statements = documented_reader_role()
    name = pg_url.rsplit("/", 1)[1]
    mine = f"docs_{name[-12:]}"
    script = statements.replace(role, mine).replace(f'"{database}"', f'"{name}"')
    dsn = pg_url.replace("postgresql+asyncpg", "postgresql")

    async def admin(sql_text: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql_text)
        finally:
            await conn.close()

    asyncio.run(admin(script))
    try:
        reader = pg_url.replace("postgres@", f"{mine}@", 1)
        capsys.readouterr()
        assert main(["sql", "--store", reader, "SELECT count(*) AS n FROM events"]) == 0
        assert main(["sql", "--store", reader, "DELETE FROM events"]) == 2
        assert "permission denied" in error_line(capsys)
        asyncio.run(admin(script))  # idempotent: a second run re-grants
    finally:
        asyncio.run(admin(f'DROP OWNED BY "{mine}"; DROP ROLE "{mine}"'))

"""``sql``, ``usage``, ``events`` and ``projections`` on a
store the demo filled, through pipes, on a terminal and at 80 columns."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.cli.conftest import LLMTRAIL, cli_env, llmtrail, llmtrail_on_a_terminal

pytestmark = pytest.mark.slow

CALL_ID = re.compile(r"\b[0-9a-f]{32}\b")


def test_sql_and_usage_catch_the_projections_up_first_or_say_how_far_behind(
    demo_store: str,
) -> None:
    statement = "SELECT coalesce(sum(calls), 0) AS calls FROM usage_daily"
    stale = llmtrail("sql", statement, "--store", demo_store, "--json", "--no-catch-up")
    assert stale.code == 0, stale.err
    assert stale.json() == [{"calls": 0}]  # the demo applied nothing to the projections...
    (note,) = stale.err.splitlines()  # ...and the command says so, on stderr, in one line
    assert "projections lag the event log" in note and "usage_daily by" in note
    lag = int(re.search(r"usage_daily by (\d+) events", note).group(1))  # type: ignore[union-attr]
    events = llmtrail(
        "sql", "SELECT count(*) AS n FROM events", "--store", demo_store, "--json", "--no-catch-up"
    )
    assert lag == events.json()[0]["n"] > 0

    usage_stale = llmtrail("usage", "--store", demo_store, "--json", "--no-catch-up")
    assert usage_stale.code == 0 and usage_stale.json() == []
    assert "projections are up to date" not in usage_stale.err

    fresh = llmtrail("sql", statement, "--store", demo_store, "--json")
    assert fresh.code == 0, fresh.err
    assert fresh.json() == [{"calls": 60}]  # brought up to date before reading
    after = llmtrail("usage", "--store", demo_store, "--json", "--no-catch-up")
    assert "projections are up to date with the event log" in after.err
    assert sum(row["calls"] for row in after.json()) == 60


def test_events_in_a_pipe_are_whole_lines_newest_first_and_head_stops_it_quickly(
    demo_store: str,
) -> None:
    everything = llmtrail("events", "--store", demo_store, "--all", "--json").json_lines()
    started = time.monotonic()
    done = subprocess.run(
        f"'{LLMTRAIL}' events --store '{demo_store}' --all | head -5",
        shell=True,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    took = time.monotonic() - started
    assert done.stderr == ""  # no BrokenPipeError, no traceback
    lines = done.stdout.splitlines()
    assert len(lines) == 5
    newest = sorted(everything, key=lambda e: -e["position"])[:5]
    for line, event in zip(lines, newest, strict=True):
        fields = line.split()
        assert int(fields[0]) == event["position"]
        assert fields[2] == event["call_id"]  # whole, so grep finds it
        assert fields[4] == event["type"]
    assert took < 60  # hang detection only; the speed is not what this test measures


def test_events_plain_lines_keep_every_detail_including_error_messages(demo_store: str) -> None:
    failed = llmtrail(
        "events", "--store", demo_store, "--type", "attempt_failed", "--json", "--all"
    ).json_lines()
    assert failed, "the demo's 20% server faults left failed attempts"
    plain = llmtrail("events", "--store", demo_store, "--type", "attempt_failed", "--all")
    lines = plain.out.splitlines()
    assert len(lines) == len(failed)
    for line, event in zip(lines, failed, strict=True):
        message = event["payload"]["message"]
        assert len(message) > 20
        assert f"message={json.dumps(message)}" in line  # whole, quoted: one token for awk


def test_events_default_limit_and_json_lines(demo_store: str) -> None:
    rows = llmtrail("events", "--store", demo_store, "--json").json_lines()
    assert len(rows) == 100  # the default --limit; the demo stored more
    assert [r["position"] for r in rows] == sorted((r["position"] for r in rows), reverse=True)
    same = llmtrail("events", "--store", demo_store, "--format", "json", "--limit", "3")
    assert same.json_lines() == rows[:3]


def test_events_on_an_80_column_terminal_wrap_details_and_keep_call_ids_whole(
    demo_store: str,
) -> None:
    run = llmtrail_on_a_terminal("events", "--store", demo_store, "--limit", "30", columns=80)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert max(len(line) for line in lines) <= 80
    heads = [line for line in lines if CALL_ID.search(line) and not line.startswith(" ")]
    assert len(heads) == 30
    details = [line for line in lines if line.startswith("    ")]
    assert any("position=" in line for line in details)


def test_usage_table_fits_80_columns_hides_by_priority_and_never_cuts_a_number(
    demo_store: str,
) -> None:
    data = llmtrail("usage", "--store", demo_store, "--by", "operation", "--json").json()
    table = llmtrail("usage", "--store", demo_store, "--by", "operation", "--format", "table")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "hidden at 80 columns:" in table.out and "…" not in table.out
    cost_decimals = set()
    for row in data:
        (line,) = [line for line in lines if line.startswith(row["operation"] + " ")]
        cells = line.split()
        assert int(cells[1]) == row["calls"]  # calls: never hidden, whole
        assert cells[-1].rstrip("0") == row["cost_usd"].rstrip("0")  # exact, not rounded
        cost_decimals.add(len(cells[-1].split(".")[1]))
    assert len(cost_decimals) == 1  # the same decimals down the column
    wide = llmtrail(
        "usage", "--store", demo_store, "--by", "operation", "--format", "table", COLUMNS="200"
    )
    assert "hidden" not in wide.out and "reasoning_tokens" in wide.out
    on_terminal = llmtrail_on_a_terminal("usage", "--store", demo_store, "--by", "operation")
    assert on_terminal.code == 0 and "hidden at 80 columns:" in on_terminal.out
    assert max(len(line) for line in on_terminal.out.splitlines()) <= 80


def test_sql_output_in_a_pipe_is_plain_and_aligned_and_a_table_on_a_terminal(
    demo_store: str,
) -> None:
    statement = "SELECT operation_name, calls, cost_usd FROM usage_daily ORDER BY operation_name"
    plain = llmtrail("sql", statement, "--store", demo_store)
    lines = plain.out.splitlines()
    assert lines[0].split() == ["operation_name", "calls", "cost_usd"]
    header_calls = re.search(r"\bcalls\b", lines[0])
    assert header_calls is not None
    for line in lines[1:]:  # numbers right-aligned: each `calls` ends under the header's end
        tokens = list(re.finditer(r"\S+", line))
        assert tokens[1].end() == header_calls.end(), line
    assert "─" not in plain.out  # no box drawing in a pipe
    table = llmtrail_on_a_terminal("sql", statement, "--store", demo_store)
    assert table.code == 0 and "─" in table.out


@pytest.mark.parametrize(
    "argv",
    [
        ["usage", "--json"],
        ["usage", "--format", "json"],
        ["sql", "SELECT 1 AS one", "--json"],
        ["projections", "status", "--json"],
        ["projections", "run", "--json"],
        ["projections", "rebuild", "--json"],
        ["migrate", "--json"],
        ["events", "--json", "--limit", "1"],
        ["events", "--incomplete", "--json"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_every_store_command_takes_json(demo_store: str, argv: list[str]) -> None:
    run = llmtrail(*argv, "--store", demo_store)
    assert run.code == 0, run.err
    if argv[0] == "events":
        run.json_lines()
    else:
        json.loads(run.out)

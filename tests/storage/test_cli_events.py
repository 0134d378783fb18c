"""``llmtrail migrate`` and ``llmtrail events``, through the parser that ``register`` builds."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llmtrail.pipeline import Event, EventType
from llmtrail.storage import EventStore, open_store_sink
from llmtrail.storage._cli import add_store_argument, parse_time, register
from tests.storage.test_store_contract import LIFECYCLE, T0, call_events, interleave


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrail")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def populate(url: str, events: list[Event]) -> None:
    async def main() -> None:
        writer = open_store_sink(url, instance="cli:1")
        await writer.start()
        for event in events:
            writer.emit(event)
        await writer.aclose()

    asyncio.run(main())


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def filled(store_url: str) -> tuple[str, list[Event]]:
    done = call_events("done", trace_id="d" * 32, start=T0)
    unfinished = call_events("unfinished", types=LIFECYCLE[:4], start=T0 + timedelta(hours=1))
    events = interleave(done, unfinished)
    populate(store_url, events)
    return store_url, events


def test_migrate_creates_the_schema_then_reports_it_is_current(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["migrate", "--store", sqlite_url]) == 0
    assert "migrated from empty to" in capsys.readouterr().out
    assert run(["migrate", "--store", sqlite_url, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["from"] == result["to"] == result["head"]


def test_events_json_lines_are_every_event_newest_first(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, events = filled
    assert run(["events", "--store", url, "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["event_id"] for r in rows] == [e.event_id for e in reversed(events)]
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions, reverse=True)  # type: ignore[type-var]
    assert rows[0]["instance"] == "cli:1"
    assert run(["events", "--store", url, "--json", "--oldest-first"]) == 0
    assert [r["event_id"] for r in json_lines(capsys.readouterr().out)] == [
        e.event_id for e in events
    ]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--call", "unfinished"], lambda e: e.call_id == "unfinished"),
        (["--trace", "d" * 32], lambda e: e.trace_id == "d" * 32),
        (["--type", "gate_wait"], lambda e: e.type is EventType.GATE_WAIT),
        (["--type", "sent", "--type", "completed"], lambda e: e.type in {"sent", "completed"}),
        (
            ["--since", (T0 + timedelta(minutes=30)).isoformat()],
            lambda e: e.call_id == "unfinished",
        ),
        (["--until", "2025-03-01T12:30:00Z"], lambda e: e.call_id == "done"),
    ],
)
def test_events_filters(
    filled: tuple[str, list[Event]],
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    expected: object,
) -> None:
    url, events = filled
    assert run(["events", "--store", url, "--json", "--oldest-first", *options]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert callable(expected)
    assert [r["event_id"] for r in rows] == [e.event_id for e in events if expected(e)]
    assert rows


def test_events_limit_caps_the_output_newest_first_by_default(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, events = filled
    assert run(["events", "--store", url, "--json", "--limit", "3"]) == 0
    assert [r["event_id"] for r in json_lines(capsys.readouterr().out)] == [
        e.event_id for e in events[::-1][:3]
    ]
    assert run(["events", "--store", url, "--json", "--limit", "3", "--oldest-first"]) == 0
    assert [r["event_id"] for r in json_lines(capsys.readouterr().out)] == [
        e.event_id for e in events[:3]
    ]


def test_events_plain_lines_hold_each_event_whole(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, events = filled
    assert run(["events", "--store", url, "--call", "done"]) == 0  # a pipe: plain lines
    lines = capsys.readouterr().out.splitlines()
    done = [e for e in events if e.call_id == "done"]
    assert len(lines) == len(done)
    assert lines[0].split()[2:5] == ["done", str(done[-1].seq), "completed"]
    assert lines[-1].split()[4] == "trace_created"


def test_events_incomplete_lists_calls_that_never_completed(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = filled
    assert run(["events", "--store", url, "--incomplete", "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [(r["call_id"], r["last_event"], r["sent"]) for r in rows] == [
        ("unfinished", str(LIFECYCLE[3]), False)
    ]


def test_events_follow_prints_new_events_as_they_are_stored(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = call_events("old")
    new = call_events("new")
    populate(sqlite_url, old)
    capsys.readouterr()  # the migration's log line
    following = threading.Event()
    last_position = EventStore.last_position

    async def observed(self: EventStore) -> int:
        position = await last_position(self)
        following.set()  # the command has found the end of the log it follows from
        return position

    monkeypatch.setattr(EventStore, "last_position", observed)
    argv = ["events", "--store", sqlite_url, "--follow", "--poll", "0.01", "--json"]
    result: list[int] = []
    follower = threading.Thread(
        target=lambda: result.append(run([*argv, "--limit", str(len(new))]))
    )
    follower.start()
    assert following.wait(30)
    populate(sqlite_url, new)  # written while the command follows the end of the log
    follower.join(30)

    assert result == [0]
    rows = json_lines(capsys.readouterr().out)
    # From the end of the log: the old events were there before it started.
    assert [r["event_id"] for r in rows] == [e.event_id for e in new]


def test_events_follow_since_starts_from_that_time(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, events = filled
    assert (
        run(
            [
                "events",
                "--store",
                url,
                "--follow",
                "--json",
                "--since",
                T0.isoformat(),
                "--limit",
                "2",
            ]
        )
        == 0
    )
    assert [r["event_id"] for r in json_lines(capsys.readouterr().out)] == [
        e.event_id for e in events[:2]
    ]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["events", "--since", "yesterday-ish"], "--since 'yesterday-ish' is not a time"),
        (["events", "--type", "sneezed"], "--type 'sneezed' is not an event type"),
        (["events", "--limit", "-1"], "--limit -1 is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    filled: tuple[str, list[Event]], capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    url, _ = filled
    assert run([*argv, "--store", url]) == 2
    err = capsys.readouterr().err
    assert says in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_bad_store_url_is_exit_code_2_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["events", "--store", "mysql://root:hunter2@db/events"]) == 2
    err = capsys.readouterr().err
    assert "unsupported driver" in err and "postgresql+asyncpg://" in err
    assert "hunter2" not in err


def test_a_missing_store_is_reported_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    assert run(["events", "--store", url]) == 2
    assert "no event store" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_an_unreachable_server_is_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 9 (discard) of the loopback.
    assert run(["events", "--store", "postgresql://nobody@127.0.0.1:9/none"]) == 1
    err = capsys.readouterr().err
    assert "cannot open the event store" in err and "Traceback" not in err


def test_store_defaults_to_the_environment_then_llmtrail_db(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    add_store_argument(parser)
    monkeypatch.delenv("LLMTRAIL_STORE_URL", raising=False)
    assert parser.parse_args([]).store == "sqlite+aiosqlite:///llmtrail.db"
    monkeypatch.setenv("LLMTRAIL_STORE_URL", "postgresql://u@h/db")
    assert parser.parse_args([]).store == "postgresql://u@h/db"
    assert parser.parse_args(["--store", "sqlite:///x.db"]).store == "sqlite:///x.db"


def test_times_are_iso_or_an_age() -> None:
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now=now) == now - timedelta(minutes=15)
    assert parse_time("2025-05-01T10:00:00+02:00") == datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
    assert parse_time("2025-05-01 10:00") == datetime(2025, 5, 1, 10, 0, tzinfo=UTC)

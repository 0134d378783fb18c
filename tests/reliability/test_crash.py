"""A process making calls into a SQLite store is killed with SIGKILL; the store must survive.

The child (``_worker.py``) prints the ids of the events each ``flush()`` acknowledged. After the
kill the database must pass ``PRAGMA integrity_check``, hold every acknowledged event, rebuild
its projections, and show the calls that never got ``completed`` as ``interrupted``, both in the
``calls`` projection and in ``llmtrail events --incomplete``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability._support import (
    by_call,
    sqlite_path,
    sqlite_rows,
    stored_events_sqlite,
    stream_problems,
)

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).with_name("_worker.py")
LLMTRAIL = Path(sys.executable).with_name("llmtrail")
ACKS_BEFORE_KILL = 10


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LLMTRAIL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def kill_after_acks(store_url: str, stderr_path: Path) -> list[str]:
    """Run the worker until it acknowledged ACKS_BEFORE_KILL flushes, then SIGKILL it."""
    acked: list[str] = []
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(WORKER), store_url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert child.stdout is not None
        try:
            acks = 0
            deadline = time.monotonic() + 60
            while acks < ACKS_BEFORE_KILL and time.monotonic() < deadline:
                ready, _, _ = select.select([child.stdout], [], [], deadline - time.monotonic())
                if not ready:
                    break
                line = child.stdout.readline()
                if not line:  # the worker died on its own
                    break
                if line.startswith("ACK "):
                    acked += json.loads(line[4:])["events"]
                    acks += 1
            # Kill at once after reading an acknowledgement: calls are in flight right now.
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, (
        f"the worker exited with {child.returncode} before it was killed; its stderr:\n"
        + stderr_path.read_text()[-3000:]
    )
    assert acks == ACKS_BEFORE_KILL, stderr_path.read_text()[-3000:]
    return acked


@pytest.mark.slow
def test_a_killed_process_leaves_an_intact_store_with_every_acknowledged_event(
    sqlite_url: str, tmp_path: Path
) -> None:
    acked = kill_after_acks(sqlite_url, tmp_path / "worker.err")
    assert len(acked) > 100
    path = sqlite_path(sqlite_url)

    # Reopening runs WAL recovery; then the file must be sound.
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        connection.close()

    rows = stored_events_sqlite(path)
    stored_ids = {r.event_id for r in rows}
    missing = [event_id for event_id in acked if event_id not in stored_ids]
    assert not missing, f"{len(missing)} acknowledged events are not in the store"

    # Every stream is contiguous (a torn batch would leave a gap); some have no `completed`.
    calls = by_call(rows)
    problems = [p for c, s in calls.items() for p in stream_problems(c, s, complete=False)]
    assert not problems, problems[:5]
    incomplete = {c for c, s in calls.items() if s[-1].type != "completed"}
    assert incomplete, "no call was in flight at the kill: the test proved nothing"

    listed = run_cli("events", "--incomplete", "--json", "--store", sqlite_url)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert {json.loads(line)["call_id"] for line in listed.stdout.splitlines()} == incomplete

    rebuilt = run_cli("projections", "rebuild", "--store", sqlite_url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    projected = {r["call_id"]: r for r in sqlite_rows(path, "calls")}
    assert set(projected) == set(calls)
    for call_id, stream in calls.items():
        if call_id in incomplete:
            assert projected[call_id]["outcome"] == "interrupted", call_id
        else:
            assert projected[call_id]["outcome"] == stream[-1].payload["outcome"], call_id

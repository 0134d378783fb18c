"""The demo explains failures and rates; every command fails in one line."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from tests.cli.conftest import LLMTRAIL, cli_env, llmtrail

pytestmark = pytest.mark.slow


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_with_redis_down_shows_the_error_once_with_its_message_and_fix() -> None:
    redis = f"redis://127.0.0.1:{closed_port()}/0"
    run = llmtrail("demo", "--calls", "20", "--no-store", LLMTRAIL_RATE_LIMIT_URL=redis)
    assert run.code == 1  # nothing succeeded
    assert run.out.count("20 calls failed: limiter_unavailable") == 1
    assert run.out.count("cannot reach Redis") == 1  # the message, once
    assert run.out.count("fix: ") == 1
    assert len(run.err.splitlines()) < 3  # not one warning per call
    data = llmtrail(
        "demo", "--calls", "5", "--no-store", "--json", LLMTRAIL_RATE_LIMIT_URL=redis
    ).json()
    error = data["errors"]["limiter_unavailable"]
    assert error["calls"] == 5 and "Redis" in error["message"] and "Redis" in error["fix"]


def test_demo_send_rate_is_measured_over_the_gates_interval_and_never_beats_the_limit() -> None:
    # 10 requests per 1 s window: 50 calls need several windows, so the gate binds.
    run = llmtrail(
        "demo",
        "--calls",
        "50",
        "--max-rpm",
        "600",
        "--window",
        "1",
        "--latency",
        "0.01",
        "--fault-rate",
        "0",
        "--no-store",
        "--json",
    )
    assert run.code == 0, run.err
    data = run.json()
    assert data["window_capacity"] == 10
    assert 0 < data["peak_sends_per_window"] <= 10
    assert 0 < data["send_rate_rpm"] <= data["rpm_limit"]
    # The interval starts at the first send and ends one window after the last one.
    assert data["send_rate_interval_s"] >= 1.0 + (data["http_attempts"] - 1) // 10 - 0.1
    table = llmtrail("demo", "--calls", "5", "--no-store", "--latency", "0.01", "--format", "table")
    words = " ".join(table.out.split())
    assert "send rate, req/min" in words and "from the first send to one window" in words


def test_demo_with_an_unknown_model_says_unpriced_never_zero() -> None:
    run = llmtrail(
        "demo",
        "--calls",
        "6",
        "--model",
        "gpt-nonexistent-9",
        "--no-store",
        "--json",
        "--fault-rate",
        "0",
        "--latency",
        "0.01",
    )
    data = run.json()
    assert data["succeeded"] == 6
    assert data["cost_usd"] is None and data["unpriced_calls"] == 6
    table = llmtrail(
        "demo",
        "--calls",
        "3",
        "--model",
        "gpt-nonexistent-9",
        "--no-store",
        "--fault-rate",
        "0",
        "--latency",
        "0.01",
    )
    (cost,) = [line for line in table.out.splitlines() if line.startswith("cost, USD")]
    assert cost.split()[-3:] == ["unpriced", "(3", "calls)"]
    assert "not priced at $0" in " ".join((table.out + table.err).split())


def test_usage_names_unpriced_calls_in_the_total(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mixed.db'}"
    for model in ("gpt-4o-mini", "gpt-nonexistent-9"):
        demo = ("demo", "--calls", "3", "--model", model, "--fault-rate", "0", "--store", url)
        assert llmtrail(*demo, "--latency", "0.01").code == 0
    table = llmtrail("usage", "--store", url, "--by", "model", "--format", "table", COLUMNS="200")
    rows = {line.split()[0]: line.split() for line in table.out.splitlines() if line.strip()}
    assert rows["gpt-nonexistent-9"][-1] == "unpriced"
    assert Decimal(rows["gpt-4o-mini"][-1]) > 0
    assert rows["total"][-1] == rows["gpt-4o-mini"][-1]
    assert "cost_usd leaves out 3 unpriced calls" in table.out
    piped = llmtrail("usage", "--store", url, "--by", "model")
    assert "llmtrail: note: cost_usd leaves out 3 unpriced calls" in piped.err


def test_a_port_out_of_range_is_one_line_and_exit_1() -> None:
    run = llmtrail("mock-server", "--port", "80000")
    assert run.code == 1
    assert run.out == ""
    (line,) = run.err.splitlines()
    assert line.startswith("llmtrail mock-server: error:") and "65535" in line


def test_running_out_of_memory_in_sql_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'small.db'}"
    assert llmtrail("migrate", "--store", url).code == 0
    endless = (
        "WITH RECURSIVE r(i, pad) AS (SELECT 1, zeroblob(1000) UNION ALL "
        "SELECT i + 1, zeroblob(1000) FROM r) SELECT i, pad FROM r"
    )
    limit = 1_500_000_000  # bytes of address space: the rows cannot all fit

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [str(LLMTRAIL), "sql", endless, "--store", url, "--no-catch-up", "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
        preexec_fn=cap_memory,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("llmtrail sql: error")]
    assert len(errors) == 1, done.stderr[-2000:]


@pytest.mark.parametrize(
    "argv",
    [
        ["events", "--follow", "--poll", "0.05"],
        ["projections", "run", "--follow", "--interval", "0.05"],
    ],
    ids=["events --follow", "projections run --follow"],
)
def test_ctrl_c_exits_130_without_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'follow.db'}"
    assert llmtrail("migrate", "--store", url).code == 0
    process = subprocess.Popen(
        [str(LLMTRAIL), *argv, "--store", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    time.sleep(3)  # let it start following; there is no output to wait for on an empty log
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err

"""Driving the installed ``llmtrail`` console script as a user would: through a pipe, through a
pseudo-terminal, at ``COLUMNS=80``, against the local server and a real SQLite store."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LLMTRAIL = Path(sys.executable).with_name("llmtrail")


def cli_env(**extra: str) -> dict[str, str]:
    """The user's environment without llmtrail settings that would change the outcome."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLMTRAIL_", "OTEL_", "OPENAI_")) and k not in ("COLUMNS", "LINES")
    }
    env.update(OTEL_SDK_DISABLED="true", COLUMNS="80", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def llmtrail(*args: str, cwd: Path | None = None, timeout: float = 120, **env: str) -> Run:
    """``llmtrail ARGS`` with stdout and stderr read through pipes (not a terminal)."""
    done = subprocess.run(
        [str(LLMTRAIL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def llmtrail_on_a_terminal(*args: str, columns: int = 80, timeout: float = 120) -> Run:
    """``llmtrail ARGS`` with stdout on a pseudo-terminal ``columns`` wide (stderr a pipe)."""
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    attrs = termios.tcgetattr(follower)
    attrs[1] &= ~termios.ONLCR  # no \r\n translation: read lines as the program wrote them
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    process = subprocess.Popen(
        [str(LLMTRAIL), *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(COLUMNS=str(columns), TERM="dumb"),
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the program exited and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    _, err = process.communicate(timeout=30)
    return Run(process.returncode, b"".join(chunks).decode(), err.decode())


@pytest.fixture(scope="session")
def mock_url() -> Iterator[str]:
    """``llmtrail mock-server`` on a free port of 127.0.0.1; its URL (without ``/v1``)."""
    process = subprocess.Popen(
        [str(LLMTRAIL), "mock-server", "--latency-s", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store filled by ``llmtrail demo`` (60 calls, 20% server faults), projections not run."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    url = f"sqlite+aiosqlite:///{path}"
    run = llmtrail(
        "demo",
        "--calls",
        "60",
        "--fault-rate",
        "0.2",
        "--latency",
        "0.01",
        "--store",
        url,
        "--json",
    )
    assert run.code == 0, run.err
    assert run.json()["calls"] == 60
    return url

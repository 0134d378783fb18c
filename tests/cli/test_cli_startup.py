"""``llmtrail --help`` stays light: building the parser imports none of the heavy libraries.

Start-up time itself is measured in ``benchmarks/bench_startup.py``; this test checks the cause
of a slow start-up (a heavy import reaching the parser), which fails the same way on any
machine, loaded or not.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Each costs 0.05 s to 1 s to import, and none is needed to list the commands and options.
HEAVY = (
    "sqlalchemy",
    "alembic",
    "openai",
    "opentelemetry.sdk",
    "structlog",
    "pydantic",
    "numpy",
    "matplotlib",
    "aiohttp",
    "redis",
    "asyncpg",
)

PROBE = f"""
import contextlib, io, json, sys
from llmtrail.pipeline._cli import main
out = io.StringIO()
code = None
with contextlib.redirect_stdout(out):
    try:
        main(["--help"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{
    "code": code,
    "help": out.getvalue(),
    "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules),
}}))
"""


def test_help_lists_every_command_without_importing_a_heavy_library() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""  # no plugin failed to register its commands
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    commands = ("demo", "mock-server", "migrate", "events", "projections", "usage", "sql")
    for command in (*commands, "replay", "traces"):
        assert command in report["help"], command
    assert report["heavy"] == []

"""Smoke test of the benchmark harness: one tiny run of the overhead bench, end to end.

It proves that ``python -m benchmarks`` starts its servers, runs the real SDK and the real
pipeline side by side, computes medians, ratios and target statuses, and writes a results
file. It does not judge speed: ``LLMTRAIL_BENCH_TINY=1`` shrinks the counts far below
meaningful figures, and the output goes to a temporary file, never to the committed
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_overhead_run_writes_figures_for_sdk_and_pipeline(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    env = {**os.environ, "LLMTRAIL_BENCH_TINY": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "overhead"]
        + ["--output", str(output), "--timeout", "120"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    text = output.read_text()
    assert "## Machine" in text
    assert re.search(r"\| openai \| \d+\.\d+", text)
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in text.splitlines()
        if line.startswith("| ") and " | " in line
    }
    bare = rows["bare SDK: throughput"]
    assert re.search(r"\| [\d,.]+ \| calls/s \| 2 \(", bare), bare
    pipeline = rows["pipeline, no store, no tracing: throughput"]
    # A median, a ratio to the bare SDK measured in the same run, the target and a
    # verdict: the four things every figure must carry.
    verdict = (
        r"\| [\d,.]+ \| calls/s \| .* \| [\d.]+% of bare SDK "
        r"\| >= (90|85|75)% of bare SDK \| (PASS|MISS) \|$"
    )
    assert re.search(verdict, pipeline), pipeline
    for variant in ("pipeline + SQLite store", "pipeline + OTLP tracing"):
        assert re.search(verdict, rows[f"{variant}: throughput"]), rows[f"{variant}: throughput"]
    # Tracing's figures: CPU per traced call against the bare SDK's, and the dead collector.
    cpu = rows["pipeline + OTLP tracing: client CPU per call"]
    assert re.search(r"\| <= 1\.25x bare SDK \| (PASS|MISS) \|$", cpu), cpu
    down = rows["pipeline + OTLP tracing, collector down: calls/s vs collector up"]
    assert re.search(r"\| >= 95% of collector up \| (PASS|MISS) \|$", down), down
    close = rows["pipeline + OTLP tracing, collector down: flush + close of the service"]
    assert re.search(r"\| (PASS|MISS) \|$", close), close
    if importlib.util.find_spec("opentelemetry.instrumentation.openai") is not None:
        peer = rows["bare SDK + OpenLLMetry tracing: client CPU per call"]
        # Against the bare SDK run in a child process too, as the peer is.
        assert re.search(r"\| [\d.]+% of bare SDK, child process \|", peer), peer
    # Reported beside them without a target of their own:
    for variant in ("pipeline + SQLite store + OTLP tracing", "SDK request path, hand-read answer"):
        row = rows[f"{variant}: throughput"]
        assert re.search(r"\| [\d.]+% of bare SDK \| +\| INFO \|$", row), row
    assert re.search(r"accepted [1-9]\d* trace", text), "no span export reached the receiver"
    statuses = {line.rstrip(" |").rsplit(" | ", 1)[-1] for line in rows.values()}
    assert not any(s.startswith("ERROR") for s in statuses), text
    assert "- ERROR:" not in text, text

"""Start-up: how long ``import llmtrail``, ``import llmtrail.storage``, ``import
llmtrail.telemetry`` and ``llmtrail --help`` take in a fresh interpreter.

Each repetition is a new ``python`` process (nothing cached in memory but the OS's file cache),
timed from spawn to exit, so the figures include the interpreter's own start-up; the
baseline ``python -c pass`` is measured in the same rounds and reported beside them. The
import of the OpenAI SDK alone is shown as well, since that is what the light seam avoids.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ._report import Figure, Section, Target, median

LLMTRAIL = str(Path(sys.executable).with_name("llmtrail"))

CASES: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import llmtrail": [sys.executable, "-c", "import llmtrail"],
    "import llmtrail.storage": [sys.executable, "-c", "import llmtrail.storage"],
    "import llmtrail.telemetry": [sys.executable, "-c", "import llmtrail.telemetry"],
    "import openai (the SDK alone)": [sys.executable, "-c", "import openai"],
    "from llmtrail import BaseLLMService": [
        sys.executable,
        "-c",
        "from llmtrail import BaseLLMService",
    ],
    "llmtrail --help": [LLMTRAIL, "--help"],
}

TARGETS = {
    "llmtrail --help": Target("<", 1.0, label="well under 1 s"),
    "import llmtrail.storage": Target("<", 0.5, label="no SDK import (< 0.5 s)"),
}


def _time(argv: list[str]) -> float:
    env = dict(os.environ, OTEL_SDK_DISABLED="true")
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - started


def main(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 10
    section = Section("startup", "Start-up and import time")
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for argv in CASES.values():  # warm the OS file cache once; not counted
        _time(argv)
    for _ in range(reps):  # interleaved rounds: a load spike hits every case alike
        for name, argv in CASES.items():
            samples[name].append(_time(argv))
    for name, values in samples.items():
        section.add(
            Figure(
                name,
                "s",
                values,
                target=TARGETS.get(name),
                note="" if name != "python -c pass" else "the interpreter alone",
            )
        )
    section.notes.append(
        f"{reps} fresh processes per case, median wall time; interpreter start-up "
        f"{median(samples['python -c pass']):.3f} s is included in every figure."
    )
    return section.to_dict()

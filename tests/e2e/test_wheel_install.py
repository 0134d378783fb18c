"""The built wheel, installed into a fresh virtual environment with the core dependencies only,
next to an application that has its own ``storage``, ``telemetry`` and ``pipeline`` packages.

It proves the issue's promises as a new user meets them: the wheel holds only ``llmtrail/`` at its
top level, the application's own packages are never shadowed (nor do they shadow ours), a call
with the SQLite store works without any extra, ``import llmtrail.storage`` does not import the
OpenAI SDK, and a missing extra is named in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from llmtrail.testing import MockServerConfig, running_in_process

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

APP = """
import asyncio, json, sys

import storage, telemetry, pipeline  # the application's own packages
from llmtrail import BaseLLMService, GenerationRequest

async def main(url: str, db: str) -> None:
    async with BaseLLMService(
        base_url=url, api_key="sk-test", store_url=f"sqlite+aiosqlite:///{db}", max_rpm=600
    ) as service:
        result = await service.execute_generation_async(
            GenerationRequest(user_prompt="Say hi"), "greet"
        )
    import llmtrail.storage
    print(json.dumps({
        "success": result.success,
        "error": result.error_message,
        "own": [storage.OWN, telemetry.OWN, pipeline.OWN],
        "llmtrail_storage": llmtrail.storage.__file__,
    }))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["OTEL_SDK_DISABLED"] = "true"
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_wheel_installs_alone_and_runs_a_call_beside_an_apps_own_packages(
    tmp_path: Path,
) -> None:
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("llmtrail-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"llmtrail"}

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    app = tmp_path / "app"
    for name in ("storage", "telemetry", "pipeline"):
        (app / name).mkdir(parents=True)
        (app / name / "__init__.py").write_text(f"OWN = {name!r}\n")
    (app / "main.py").write_text(textwrap.dedent(APP))

    with running_in_process(MockServerConfig()) as url:
        ran = _run([str(python), "main.py", f"{url}/v1", str(tmp_path / "app.db")], cwd=app)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report["success"], report
    assert report["own"] == ["storage", "telemetry", "pipeline"]
    assert str(venv) in report["llmtrail_storage"]

    light = _run(
        [
            str(python),
            "-c",
            "import sys, llmtrail.storage, llmtrail.telemetry; "
            "print(sorted(m for m in ('openai', 'numpy', 'aiohttp') if m in sys.modules))",
        ],
        cwd=app,
    )
    assert light.returncode == 0, light.stderr
    assert light.stdout.strip() == "[]"

    missing = _run(
        [
            str(python),
            "-c",
            "from llmtrail import BaseLLMService; "
            "BaseLLMService(api_key='sk-test', store_url=None, max_rpm=1,"
            " rate_limit_url='redis://127.0.0.1:6379/0')",
        ],
        cwd=app,
    )
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "pip install 'llmtrail[redis]'" in last, missing.stderr

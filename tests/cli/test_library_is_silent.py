"""The library prints nothing and configures no logging; the application decides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import cli_env

pytestmark = pytest.mark.slow

SCRIPT = """
import asyncio, logging, sys
if sys.argv[1] == "app-logging":
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(name)s|%(message)s|%(store)s")
    logging.getLogger("httpx2").setLevel("WARNING")
from llmtrail import BaseLLMService, GenerationRequest

async def main():
    async with BaseLLMService("gpt-4o-mini", store_url="sqlite+aiosqlite:///new.db") as service:
        request = GenerationRequest(user_prompt="hi")
        result = await service.execute_generation_async(request, "greet")
        assert result.success, result.error_message
    if sys.argv[1] == "silent":  # the library configured no handler of its own
        assert not logging.getLogger().handlers

asyncio.run(main())
"""


def run_script(tmp_path: Path, mock_url: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(OPENAI_BASE_URL=f"{mock_url}/v1", OPENAI_API_KEY="sk-local-test")
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def test_a_service_on_a_new_store_prints_nothing_on_stdout_or_stderr(
    tmp_path: Path, mock_url: str
) -> None:
    done = run_script(tmp_path, mock_url, "silent")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new.db").exists()  # the store was created and migrated...
    assert done.stdout == ""  # ...without a word: no "[info] event store migrated"
    assert done.stderr == ""


def test_library_logs_go_to_the_applications_logging_by_module_name(
    tmp_path: Path, mock_url: str
) -> None:
    done = run_script(tmp_path, mock_url, "app-logging")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.startswith("llmtrail.")]
    # A stdlib logger named by the module, the message, and the structured field as `extra`.
    assert "llmtrail.storage._migrate|event store migrated|sqlite+aiosqlite:///new.db" in lines

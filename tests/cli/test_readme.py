"""The README's API examples run as written; the documented commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import cli_env

README = Path(__file__).resolve().parents[2] / "README.md"


def api_examples() -> list[str]:
    """The Python blocks of the README's "The API" section, in order."""
    section = README.read_text().split("## The API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_api_section_shows_an_async_script_and_its_sync_twin() -> None:
    async_example, sync_example = api_examples()[:2]
    assert "asyncio.run(main())" in async_example and "async with" in async_example
    assert "execute_generation(" in sync_example and "async" not in sync_example


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["asyncio.run", "sync"])
def test_each_api_example_runs_as_a_script_against_the_local_server(
    tmp_path: Path, mock_url: str, index: int
) -> None:
    script = tmp_path / "hello.py"
    script.write_text(api_examples()[index])
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(OPENAI_BASE_URL=f"{mock_url}/v1", OPENAI_API_KEY="sk-local-readme"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # the library printed nothing of its own
    first = done.stdout.splitlines()[0].split()
    assert first[0] == "True"  # result.success
    assert (tmp_path / "llmtrail.db").exists()  # the store the example names


def test_the_readme_keeps_the_full_test_command_and_documents_the_quick_subset() -> None:
    text = README.read_text()
    full = (
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
        ".venv/bin/python -m pytest\n"
    )
    assert full in text
    assert '.venv/bin/python -m pytest -m "not slow"' in text
    pyproject = (README.parent / "pyproject.toml").read_text()
    assert '"slow: ' in pyproject  # the marker is registered (--strict-markers)

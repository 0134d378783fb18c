"""Bad input gets a clear one-line error (or an exit code from the CLI), never a traceback.

- Invalid requests raise ``ValueError`` naming the field; through the service they become a
  ``validation`` failure with a complete event stream, and nothing is sent.
- Bad configuration raises ``ConfigurationError`` naming the argument.
- The CLI answers bad usage with exit code 2 and a failure with exit code 1, with exactly one
  error line and no traceback: unknown options, bad limits, a malformed store URL, a file that
  is not a database, a store at an unknown schema revision.
- A provider answer that is not valid JSON, or has no usage, is an ``invalid_response`` failure
  of that call, not a crash, and it is not retried.
- Text no database holds verbatim: lone surrogates are refused at the request; NUL characters
  are stored on both backends and read back exactly, and never stop the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from llmtrail.pipeline import BaseLLMService, ConfigurationError, GenerationRequest, LLMTrailError
from llmtrail.pipeline._cli import main
from tests.conftest import RecordingSink
from tests.reliability._support import (
    assert_store_equals_emitted,
    assert_streams_complete,
    completed,
    stored_events,
)

pytestmark = pytest.mark.timeout(120)

LLMTRAIL = Path(sys.executable).with_name("llmtrail")
KEY = "sk-test-bad-input"


def one_line(message: str) -> str:
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# ---------------------------------------------------------------- invalid requests


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "user_prompt"),
        ({"user_prompt": "hi", "temperature": 3.5}, "temperature"),
        ({"user_prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"user_prompt": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"user_prompt": "hi", "max_output_tokens": True}, "max_output_tokens"),
        ({"user_prompt": "hi", "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"user_prompt": "hi", "metadata": {"tenant": 7}}, "metadata"),
        ({"user_prompt": "hi", "model": ""}, "model"),
        ({"user_prompt": 42}, "user_prompt"),
        ({"input": [{"role": "robot", "content": "x"}]}, "role"),
        ({"user_prompt": "hi", "response_schema": dict}, "response_schema"),
    ],
)
def test_an_invalid_request_raises_a_one_line_value_error_naming_the_field(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError) as caught:
        GenerationRequest(**fields)
    assert named in one_line(str(caught.value))


async def test_an_invalid_request_through_the_service_fails_validation_and_sends_nothing(
    mock_server: Any, recorder: RecordingSink
) -> None:
    async with BaseLLMService(
        base_url=f"{mock_server.url}/v1",
        api_key=KEY,
        store_url=None,
        tracing=False,
        sinks=[recorder],
    ) as service:
        bad: list[Any] = [{"user_prompt": "hi", "temperature": 9}, 42, {"nonsense": 1}]
        results = [await service.execute_generation_async(b, "bad") for b in bad]
    assert mock_server.log == []
    calls = assert_streams_complete(recorder.events)
    for result, named in zip(results, ("temperature", "int", "nonsense"), strict=True):
        assert not result.success
        assert str(result.error_type) == "validation"
        assert named in one_line(result.error_message or "")
        assert [str(e.type) for e in calls[result.call_id]] == ["trace_created", "completed"]
        assert completed(calls[result.call_id])["outcome"] == "failed"


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_rpm": -1}, "max_rpm"),
        ({"max_tpm": 0}, "max_tpm"),
        ({"max_rpm": 1.5}, "max_rpm"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"max_concurrent_requests": -3}, "max_concurrent_requests"),
        ({"rpm_window_seconds": 0}, "rpm_window_seconds"),
        ({"request_timeout_s": -1}, "request_timeout_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"model": ""}, "model"),
        ({"max_rpm": 10, "rpm_window_seconds": 1}, "rpm"),  # 10/min is 0 per 1 s window
    ],
)
def test_bad_configuration_raises_a_one_line_configuration_error_naming_it(
    kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BaseLLMService(api_key=KEY, store_url=None, tracing=False, **kwargs)
    assert named in one_line(str(caught.value))


def test_a_bad_limit_in_the_environment_raises_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMTRAIL_MAX_RPM", "lots")
    with pytest.raises(ConfigurationError) as caught:
        BaseLLMService(api_key=KEY, store_url=None, tracing=False)
    assert "LLMTRAIL_MAX_RPM" in one_line(str(caught.value))


@pytest.mark.parametrize(
    "url",
    ["not a url", "mysql://root@127.0.0.1/llmtrail", "postgresql+asyncpg://postgres@127.0.0.1"],
)
def test_a_malformed_store_url_raises_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BaseLLMService(api_key=KEY, store_url=url, tracing=False)
    one_line(str(caught.value))


# ---------------------------------------------------------------- unusable stores


def garbage_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 50)
    return path


async def bogus_revision_store(tmp_path: Path) -> str:
    """A real llmtrail store whose alembic_version names a revision nobody knows."""
    from llmtrail import storage

    url = f"sqlite+aiosqlite:///{tmp_path / 'future.db'}"
    await storage.migrate(url)
    connection = sqlite3.connect(tmp_path / "future.db")
    with connection:
        connection.execute("UPDATE alembic_version SET version_num = 'bogus_revision_9999'")
    connection.close()
    return url


async def test_a_file_that_is_not_a_database_is_refused_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{garbage_file(tmp_path)}"
    with pytest.raises(LLMTrailError) as caught:
        async with BaseLLMService(api_key=KEY, store_url=url, tracing=False):
            pass
    assert "notes.db" in one_line(str(caught.value))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
async def test_an_unreadable_database_file_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    path.touch()
    path.chmod(0)
    with pytest.raises(LLMTrailError) as caught:
        async with BaseLLMService(
            api_key=KEY, store_url=f"sqlite+aiosqlite:///{path}", tracing=False
        ):
            pass
    assert "locked.db" in one_line(str(caught.value))


async def test_a_store_at_an_unknown_schema_revision_is_refused_with_one_line(
    tmp_path: Path,
) -> None:
    url = await bogus_revision_store(tmp_path)
    with pytest.raises(LLMTrailError) as caught:
        async with BaseLLMService(api_key=KEY, store_url=url, tracing=False):
            pass
    assert "bogus_revision_9999" in one_line(str(caught.value))


# ---------------------------------------------------------------- the command line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, in a child process."""
    return subprocess.run(
        [str(LLMTRAIL), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def run_main(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``llmtrail ARGS`` in this process (the console script costs seconds of imports).

    ``main()`` sets up logging for the process, as an entry point should; it is put back
    afterwards so that later tests do not log into this test's closed capture stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog_config = structlog.get_config()
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own exit for bad usage
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)  # a no-op unless main() replaced it
        root.setLevel(level)
        structlog.configure(**structlog_config)
    out, err = capsys.readouterr()
    return code, out, err


def cli_problem(args: Sequence[str], code: int, named: str, done: tuple[int, str, str]) -> str:
    """Why a CLI run is not a clean refusal: exit ``code``, one error line naming ``named``."""
    returncode, out, err = done
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    if returncode != code:
        return f"{args}: exit {returncode}, expected {code}: {err!r}"
    if "Traceback" in out + err:
        return f"{args}: traceback: {(out + err)[-1500:]}"
    if len(errors) != 1 or named not in errors[0]:
        return f"{args}: expected one error line naming {named!r}: {errors}"
    return ""


def check_cli_cases(
    cases: Sequence[tuple[tuple[str, ...], int, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    problems = [cli_problem(a, c, n, run_main(a, capsys)) for a, c, n in cases]
    assert not any(problems), "\n".join(p for p in problems if p)


@pytest.mark.slow
def test_the_installed_console_script_refuses_bad_usage_without_a_traceback() -> None:
    args = ("demo", "--calls", "0", "--no-store")
    done = cli(*args)
    assert not cli_problem(args, 2, "--calls", (done.returncode, done.stdout, done.stderr))


def test_the_cli_answers_bad_usage_with_exit_code_2_and_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    check_cli_cases(
        [
            (("--bogus",), 2, "--bogus"),
            (("demo", "--bogus"), 2, "--bogus"),
            (("demo", "--calls", "many"), 2, "--calls"),
            (("demo", "--calls", "0", "--no-store"), 2, "--calls"),
            (("demo", "--concurrency", "0", "--no-store"), 2, "--concurrency"),
        ],
        capsys,
    )


def test_the_demo_answers_bad_limits_with_exit_code_2_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    check_cli_cases(
        [
            (("demo", "--max-rpm", "-5", "--no-store"), 2, "--max-rpm"),
            (("demo", "--max-tpm", "0", "--no-store"), 2, "--max-tpm"),
            (("demo", "--window", "-1", "--no-store"), 2, "--window"),
        ],
        capsys,
    )


def test_the_cli_refuses_unusable_stores_with_an_exit_code_and_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = f"sqlite+aiosqlite:///{garbage_file(tmp_path)}"
    future = asyncio.run(bogus_revision_store(tmp_path))
    check_cli_cases(
        [
            (("events", "--nope"), 2, "--nope"),
            (("demo", "--calls", "1", "--store", "not a url"), 2, "not a url"),
            (("events", "--store", "not a url"), 2, "not a url"),
            (("events", "--store", garbage), 2, "notes.db"),
            (("events", "--store", future), 1, "bogus_revision_9999"),
        ],
        capsys,
    )


def test_the_audit_commands_refuse_unusable_stores_with_an_exit_code_and_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = f"sqlite+aiosqlite:///{garbage_file(tmp_path)}"
    future = asyncio.run(bogus_revision_store(tmp_path))
    check_cli_cases(
        [
            (("usage", "--store", garbage), 2, "notes.db"),
            (("usage", "--store", future), 1, "bogus_revision_9999"),
            (("projections", "status", "--store", future), 1, "bogus_revision_9999"),
            (("projections", "rebuild", "--store", garbage), 2, "notes.db"),
        ],
        capsys,
    )


# ---------------------------------------------------------------- invalid provider answers


@pytest.mark.parametrize("fault", ["malformed_json", "missing_usage"])
async def test_an_answer_that_is_not_json_or_lacks_usage_is_an_invalid_response_failure(
    mock_server_factory: Any, recorder: RecordingSink, fault: str
) -> None:
    server = await mock_server_factory(fault_script=(fault,))
    async with BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key=KEY,
        store_url=None,
        tracing=False,
        sinks=[recorder],
        retry_backoff_base_s=0.01,
    ) as service:
        bad = await service.execute_generation_async(GenerationRequest(user_prompt="hi"), "x")
        good = await service.execute_generation_async(GenerationRequest(user_prompt="hi"), "x")
    assert not bad.success and str(bad.error_type) == "invalid_response"
    assert bad.attempts == 1  # not retried: the same answer would come back
    assert one_line(bad.error_message or "")
    assert good.success  # the service goes on
    calls = assert_streams_complete(recorder.events)
    failed = [e for e in calls[bad.call_id] if e.type == "attempt_failed"]
    assert [e.payload["error_type"] for e in failed] == ["invalid_response"]
    assert [r.fault for r in server.log] == [fault, None]


# ---------------------------------------------------------------- text no database stores verbatim


@pytest.mark.parametrize("field", ["user_prompt", "system_prompt", "metadata"])
def test_text_that_is_not_valid_unicode_is_refused_naming_the_field(field: str) -> None:
    bad = "half an emoji \ud83d"
    fields: dict[str, Any] = {"user_prompt": "hi"}
    fields[field] = {"note": bad} if field == "metadata" else bad
    with pytest.raises(ValueError) as caught:
        GenerationRequest(**fields)
    assert field in one_line(str(caught.value))


async def close_or_abandon(service: BaseLLMService, timeout_s: float = 5.0) -> bool:
    """Close the service; if a wedged sink keeps it from closing, cancel until it gives up,
    then close the HTTP client the abandoned close never reached (no socket is leaked).

    Returns whether it closed cleanly. Every wait is bounded."""
    closing = asyncio.ensure_future(service.aclose())
    done, _ = await asyncio.wait([closing], timeout=timeout_s)
    if done:
        closing.result()
        return True
    for _ in range(10):  # aclose flushes, then closes each sink: each step may need a cancel
        closing.cancel()
        done, _ = await asyncio.wait([closing], timeout=2.0)
        if done:
            break
    assert closing.done(), "the service could not even be abandoned"
    async with asyncio.timeout(timeout_s):
        await service.provider.aclose()
    return False


async def test_text_with_nul_characters_is_stored_and_never_wedges_the_store(
    mock_server_factory: Any, store_url: str, recorder: RecordingSink
) -> None:
    server = await mock_server_factory()
    service = BaseLLMService(
        base_url=f"{server.url}/v1",
        api_key=KEY,
        store_url=store_url,
        sinks=[recorder],
        tracing=False,
        capture_content=True,
    )
    with capture_logs() as logs:
        await service.start()
        try:
            results = [
                await service.execute_generation_async(
                    GenerationRequest(user_prompt=f"nul \x00 inside {i}", metadata={"n": "a\x00b"})
                )
                for i in range(3)
            ]
            async with asyncio.timeout(10):  # a bound: three calls' events take milliseconds
                await service.flush()
            flushed = True
        except TimeoutError:
            flushed = False
        finally:
            await close_or_abandon(service)
    assert all(r.success for r in results)
    assert flushed, f"the store never accepted the events: {outage_lines(logs)}"
    assert_store_equals_emitted(await stored_events(store_url), recorder.events)
    # PostgreSQL's jsonb cannot hold U+0000, so the row may keep it escaped; the store's own
    # reader gives back exactly what was emitted.
    from llmtrail import storage

    async with await storage.EventStore.open(store_url) as reader:
        read = [s.event for s in await reader.read(0, 10_000)]
    emitted = {e.event_id: e.payload for e in recorder.events}
    assert {e.event_id: e.payload for e in read} == emitted
    created = [e for e in read if e.type == "trace_created"]
    assert len(created) == 3 and all(e.payload["metadata"]["n"] == "a\x00b" for e in created)


def outage_lines(logs: list[dict[str, Any]]) -> list[str]:
    return [
        str(e.get("event")) + " " + str(e.get("error")) for e in logs if e["log_level"] != "info"
    ]

"""Secrets and content: the API key goes to the provider and nowhere else; text only on opt-in.

Calls run with a recognisable key (``sk-llmtrail-canary-<random>``) that the local server
requires, with tracing on (spans to an ``InMemorySpanExporter``, HTTP client spans included,
with the instrumentation told to capture every request header), logs rendered by
``telemetry.configure_logging`` at DEBUG (so openai, httpx2 and SQLAlchemy debug lines are
included), and a SQLite store. Failures are part of the run (5xx, 429, a dropped connection, a
malformed answer, a wrong key) because error paths are where secrets usually leak.

Then every log line, every span (attributes, events, resource), every event payload, every row
of every table and the raw bytes of the database files are scanned: neither key, nor any
``Authorization``/``Bearer`` value, may appear. Prompt and response text must appear only when
``capture_content=True``. The SQLite file is created 0600.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import make_url

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from llmtrail.pipeline._provider import OpenAIResponsesProvider
from llmtrail.pipeline._redact import MASK, redact_text, redact_value, register_secret
from llmtrail.storage._base import mask_url
from tests.conftest import RecordingSink
from tests.reliability._support import sqlite_path

pytestmark = pytest.mark.timeout(300)
_MAIN = "import sys; from llmtrail.pipeline._cli import main; sys.exit(main(sys.argv[1:]))"

# echo_credentials: a 400 whose body echoes the Authorization and X-Custom-Token headers.
FAULTS = ("http_500", "rate_limit_429", "echo_credentials", "drop", "malformed_json", "http_503")
UNREDACTED_CREDENTIAL = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?|bearer\s+)(?!\[REDACTED\])[A-Za-z0-9_\-]{6,}"
)


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """Everything llmtrail and the libraries log, rendered as the user would see it."""
    telemetry = pytest.importorskip("llmtrail.telemetry")
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    telemetry.configure_logging("json", "DEBUG", stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[InMemorySpanExporter, Any]]:
    telemetry = pytest.importorskip("llmtrail.telemetry")
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    # Tempt the HTTP instrumentation: ask it to record every request header.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", ".*")
    exporter = InMemorySpanExporter()
    provider = telemetry.configure(exporter=exporter)
    try:
        yield exporter, provider
    finally:
        telemetry.reset()


def database_text(path: Path) -> str:
    """Every row of every table, and the raw bytes of the database and its WAL."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        assert "events" in tables
        rows = [
            repr(row)
            for table in tables
            for row in connection.execute(f'SELECT * FROM "{table}"')  # noqa: S608
        ]
    finally:
        connection.close()
    raw = [
        p.read_bytes().decode("latin-1")
        for p in (path, path.with_name(path.name + "-wal"))
        if p.exists()
    ]
    return "\n".join([*rows, *raw])


@pytest.mark.slow
@pytest.mark.parametrize("capture_content", [False, True], ids=["default", "capture_content"])
async def test_the_api_key_appears_nowhere_and_content_only_when_captured(
    mock_server_factory: Any,
    sqlite_url: str,
    recorder: RecordingSink,
    debug_logs: io.StringIO,
    spans: tuple[InMemorySpanExporter, Any],
    capture_content: bool,
) -> None:
    canary = os.urandom(8).hex()
    key = f"sk-llmtrail-canary-{canary}"
    # A secret of no known shape, in a custom header: masked because its name says "token".
    header_secret = f"hdr{os.urandom(12).hex()}"
    wrong_key = f"sk-llmtrail-canary-wrong-{os.urandom(8).hex()}"
    prompt = f"canary-prompt-{os.urandom(8).hex()} please answer"
    server = await mock_server_factory(require_api_key=key, fault_script=FAULTS)
    common: dict[str, Any] = {
        "base_url": f"{server.url}/v1",
        "tracing": True,
        "capture_content": capture_content,
        "sinks": [recorder],
        "retry_backoff_base_s": 0.01,
        "max_attempts": 2,
    }
    results = []
    provider = OpenAIResponsesProvider(
        api_key=key,
        base_url=f"{server.url}/v1",
        http_client=httpx2.AsyncClient(headers={"X-Custom-Token": header_secret}),
    )
    common_with_key = {k: v for k, v in common.items() if k != "base_url"}
    async with BaseLLMService(
        api_key=key, provider=provider, store_url=sqlite_url, **common_with_key
    ) as service:
        for i in range(8):
            request = GenerationRequest(
                user_prompt=f"{prompt} {i}", system_prompt="be brief", metadata={"n": str(i)}
            )
            results.append(await service.execute_generation_async(request, "secrets"))
    async with BaseLLMService(api_key=wrong_key, store_url=None, **common) as intruder:
        denied = await intruder.execute_generation_async(GenerationRequest(user_prompt=prompt))
    await provider.aclose()
    exporter, tracer_provider = spans
    tracer_provider.force_flush()

    # The run really exercised the key, the failures and the store.
    assert all(r.authorization_present for r in server.log)
    assert {r.fault for r in server.log} >= set(FAULTS)
    # The provider did echo the credentials, and the call failed on it.
    echoed = [r for r in results if r.error_message and "credentials received" in r.error_message]
    assert echoed, [r.error_message for r in results]
    assert not denied.success and str(denied.error_type) == "auth"
    answers = [str(r.content) for r in results if r.success]
    assert answers and any(not r.success for r in results)
    finished = exporter.get_finished_spans()
    assert finished, "tracing produced no spans"

    path = sqlite_path(sqlite_url)
    logs = debug_logs.getvalue()
    assert "retrying" in logs  # the logs were really captured, at DEBUG
    places = {
        "logs": logs,
        "spans": "\n".join(s.to_json() for s in finished),
        "events": "\n".join(json.dumps(e.to_dict(), default=str) for e in recorder.events),
        "results": "\n".join(repr(r) for r in [*results, denied]),
        "database": database_text(path),
    }
    # The instrumentation did record request headers, so the Authorization header was at stake.
    assert "http.request.header.authorization" in places["spans"]
    for where, text in places.items():
        for secret in (key, wrong_key, canary, header_secret):
            assert secret not in text, f"the API key leaked into the {where}"
        leaked = UNREDACTED_CREDENTIAL.search(text)
        assert leaked is None, f"a credential leaked into the {where}: {leaked.group(0)!r}"

    # No logger (ours, aiosqlite's, SQLAlchemy's) wrote an event batch: a payload field name
    # and the batch insert's JSON never appear in the DEBUG logs.
    assert "estimated_input_tokens" not in logs and "INSERT INTO events" not in logs

    for where in ("logs", "spans", "events", "database"):
        has_prompt = prompt in places[where]
        has_answer = any(answer in places[where] for answer in answers)
        if capture_content and where in ("events", "database"):
            assert has_prompt and has_answer, f"captured content is missing from the {where}"
        elif not capture_content:
            assert not has_prompt, f"the prompt leaked into the {where}"
            assert not has_answer, f"the response leaked into the {where}"

    assert path.stat().st_mode & 0o777 == 0o600
    for sidecar in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if sidecar.exists():
            assert sidecar.stat().st_mode & 0o777 == 0o600, sidecar.name


# -- the one redaction pass ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-" + "A1b2" * 10,
        "sk-ant-api03-" + "x9" * 20,
        "AIza" + "Sy" * 18,
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "ghp_" + "a1B2" * 9,
        "xoxb-" + "1234567890-abcdefghij",
        "hf_" + "abcDEF123" * 4,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ],
    ids=["openai", "anthropic", "google", "aws", "github", "slack", "huggingface", "jwt"],
)
def test_known_key_shapes_are_masked_anywhere(secret: str) -> None:
    text = f'provider said: {{"error": "bad key {secret} given"}}'
    masked = redact_text(text)
    assert secret not in masked and MASK in masked
    assert redact_text(masked) == masked  # idempotent


def test_the_configured_key_of_any_shape_and_url_passwords_are_masked() -> None:
    odd = f"odd-shaped-{os.urandom(6).hex()}"
    register_secret(odd)
    assert odd not in redact_text(f"echo: {odd}!")
    url = "postgresql+asyncpg://llmtrail:p@ss-w@rd@db.internal:5432/llmtrail"
    for masked in (redact_text(f"cannot open {url}"), mask_url(url), mask_url(make_url(url))):
        assert "p@ss" not in masked and "w@rd" not in masked and "ss-w" not in masked, masked
        assert "db.internal" in masked
    headers = {"X-Custom-Token": "abc", "x-ratelimit-remaining-tokens": "10", "input_tokens": 3}
    assert redact_value(headers) == {
        "X-Custom-Token": MASK,
        "x-ratelimit-remaining-tokens": "10",
        "input_tokens": 3,
    }


# -- store files and URLs ---------------------------------------------------------------------


async def test_an_existing_store_and_its_wal_become_private(sqlite_url: str) -> None:
    path = sqlite_path(sqlite_url)
    async with BaseLLMService(api_key="sk-x", provider=None, store_url=sqlite_url) as service:
        await service.flush()
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        file.touch()
        file.chmod(0o644)
    async with BaseLLMService(api_key="sk-x", store_url=sqlite_url, tracing=False):
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if file.exists():
                assert file.stat().st_mode & 0o777 == 0o600, file.name


@pytest.mark.slow
def test_a_store_password_never_reaches_cli_output(pg_url: str, tmp_path: Path) -> None:
    tail = os.urandom(6).hex()
    # Percent-encoded (a URL that works; trust auth ignores the password), and unencoded (a
    # broken URL whose error messages must not show the part after the "@" either).
    url = pg_url.replace("postgres@", f"postgres:pw%40{tail}@", 1)
    broken = pg_url.replace("postgres@", f"postgres:pw@{tail}@", 1)
    env = {**os.environ, "LLMTRAIL_LOG_FORMAT": "json"}
    runs = [
        ["demo", "--calls", "3", "--store", url],
        ["demo", "--calls", "3", "--store", url, "--json"],
        ["events", "--store", url, "--limit", "2"],
        ["migrate", "--store", url, "--json"],
        ["events", "--store", broken, "--limit", "2"],
        ["sql", "--store", broken, "SELECT 1"],
        ["migrate", "--store", broken],
        ["demo", "--calls", "1", "--store", broken, "--json"],
    ]
    seen = []
    for argv in runs:
        done = subprocess.run(
            [sys.executable, "-c", _MAIN, *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        seen.append(done.returncode)
        for stream in (done.stdout, done.stderr):
            assert tail not in stream, (argv, stream[-500:])
    assert seen[:4] == [0, 0, 0, 0], seen  # the store was really used
    assert all(code != 0 for code in seen[4:]), seen

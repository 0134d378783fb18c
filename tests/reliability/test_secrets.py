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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmtrail.pipeline import BaseLLMService, GenerationRequest
from tests.conftest import RecordingSink
from tests.reliability._support import needs_store, sqlite_path

pytestmark = [pytest.mark.timeout(120), needs_store]

FAULTS = ("http_500", "rate_limit_429", "drop", "malformed_json", "http_503")
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
    async with BaseLLMService(api_key=key, store_url=sqlite_url, **common) as service:
        for i in range(8):
            request = GenerationRequest(
                user_prompt=f"{prompt} {i}", system_prompt="be brief", metadata={"n": str(i)}
            )
            results.append(await service.execute_generation_async(request, "secrets"))
    async with BaseLLMService(api_key=wrong_key, store_url=None, **common) as intruder:
        denied = await intruder.execute_generation_async(GenerationRequest(user_prompt=prompt))
    exporter, provider = spans
    provider.force_flush()

    # The run really exercised the key, the failures and the store.
    assert all(r.authorization_present for r in server.log)
    assert {r.fault for r in server.log} >= set(FAULTS)
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
        for secret in (key, wrong_key, canary):
            assert secret not in text, f"the API key leaked into the {where}"
        leaked = UNREDACTED_CREDENTIAL.search(text)
        assert leaked is None, f"a credential leaked into the {where}: {leaked.group(0)!r}"

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

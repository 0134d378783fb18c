"""structlog setup (telemetry._logging): call ids on every line, no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from llmtrail.pipeline import ConfigurationError
from llmtrail.telemetry import configure_logging, redact_processor

KEY = "sk-test-0123456789abcdefXYZ"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_importing_telemetry_configures_nothing() -> None:
    code = (
        "import logging, structlog, opentelemetry.trace as t, telemetry, telemetry._config as c\n"
        "assert not logging.getLogger().handlers\n"
        "assert not structlog.is_configured()\n"
        "assert type(t.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
        "assert c._configured is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_bound_call_ids_reach_every_line_of_the_call() -> None:
    log = structlog.get_logger("llmtrail")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with structlog.contextvars.bound_contextvars(
            call_id="c1", trace_id="t" * 32, span_id="s" * 16
        ):
            log.info("sent", attempt=1)
            log.warning("retrying", attempt=2)
        log.info("outside")
    assert [(e["event"], e.get("call_id"), e.get("span_id")) for e in logs] == [
        ("sent", "c1", "s" * 16),
        ("retrying", "c1", "s" * 16),
        ("outside", None, None),
    ]
    assert logs[0]["trace_id"] == "t" * 32


def test_redact_processor_masks_keys_and_headers_anywhere_in_the_event() -> None:
    with capture_logs(processors=[redact_processor]) as logs:
        structlog.get_logger().error(
            f"provider said: Incorrect API key provided: {KEY}",
            headers={"Authorization": f"Bearer {KEY}", "accept": "json"},
            api_key=KEY,
            attempts=[{"message": f"key {KEY}"}],
        )
    (entry,) = logs
    assert KEY not in repr(entry)
    assert entry["headers"] == {"Authorization": "[REDACTED]", "accept": "json"}
    assert entry["api_key"] == "[REDACTED]"


def _configured(fmt: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(format=fmt, level="DEBUG", stream=stream)
    return stream


def test_json_lines_carry_call_ids_level_and_timestamp() -> None:
    stream = _configured("json")
    with structlog.contextvars.bound_contextvars(call_id="c9", trace_id="a" * 32, span_id="b" * 16):
        structlog.get_logger("llmtrail").info("received", tokens=21)
    line = json.loads(stream.getvalue().strip())
    assert line["event"] == "received"
    assert line["call_id"] == "c9" and line["trace_id"] == "a" * 32 and line["span_id"] == "b" * 16
    assert line["level"] == "info"
    assert line["logger"] == "llmtrail"
    assert line["timestamp"].endswith("Z")
    assert line["tokens"] == 21


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_reaches_the_output_from_structlog_or_stdlib(fmt: str) -> None:
    stream = _configured(fmt)

    class Opaque:  # an object whose repr leaks a header: masked in the rendered line
        def __repr__(self) -> str:
            return f"Opaque(Authorization: Bearer {KEY})"

    log = structlog.get_logger("llmtrail")
    with structlog.contextvars.bound_contextvars(call_id="c1"):
        log.warning("auth failed", detail=f"key {KEY}", thing=Opaque())
        logging.getLogger("httpx2").warning("sending with Authorization: Bearer %s", KEY)
        logging.getLogger("sdk").info("extra", extra={"api_key": KEY})
        try:
            raise RuntimeError(f"bad key {KEY}")
        except RuntimeError:
            log.exception("crashed")
    output = stream.getvalue()
    assert KEY not in output
    assert output.count("call_id") >= 3, "stdlib records get the bound call_id too"
    assert "RuntimeError" in output, "tracebacks are still rendered"
    assert "[REDACTED]" in output


def test_format_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTRAIL_LOG_FORMAT", "json")
    stream = io.StringIO()
    configure_logging(stream=stream)
    structlog.get_logger("llmtrail").info("hello")
    assert json.loads(stream.getvalue())["event"] == "hello"


def test_level_filters_lines() -> None:
    stream = io.StringIO()
    configure_logging(format="console", level="WARNING", stream=stream)
    structlog.get_logger("llmtrail").info("quiet")
    structlog.get_logger("llmtrail").warning("loud")
    assert "quiet" not in stream.getvalue() and "loud" in stream.getvalue()


def test_configuring_twice_keeps_one_handler() -> None:
    _configured("json")
    _configured("console")
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "llmtrail"]
    assert len(ours) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"format": "xml"}, "format='xml'"), ({"level": "LOUD"}, "level='LOUD'")],
)
def test_bad_settings_name_the_value_and_the_fix(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        configure_logging(**kwargs)

"""structlog setup: console or JSON lines, call ids on every line, secrets masked.

Invariants:
- Importing this module configures nothing; :func:`configure_logging` does, and calling it
  again replaces the previous setup (it owns exactly one handler on the root logger).
- structlog and stdlib ``logging`` records go through the same chain: contextvars merge (the
  pipeline binds call_id, trace_id and span_id for the duration of each call), logger name,
  level, ISO-8601 UTC timestamp, exception formatting, then :func:`redact_processor`.
- No API key or Authorization header reaches the output: :func:`redact_processor` masks the
  event dict (values and sensitive keys), and the handler's formatter masks the rendered line
  again, which also covers objects whose ``repr`` holds a secret.
- Tracebacks are rendered to plain text *before* redaction (never by the console renderer
  afterwards, which could show local variables).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from llmtrail.pipeline import ConfigurationError

from ._redact import redact_text, redact_value

__all__ = ["configure_logging", "redact_processor"]

LOG_FORMAT_ENV: Final = "LLMTRAIL_LOG_FORMAT"
_FORMATS: Final = ("console", "json")
_HANDLER_NAME: Final = "llmtrail"


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask API keys and Authorization headers anywhere in the event dict."""
    masked: EventDict = redact_value(event_dict)
    return masked


class _RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """The last line of defence: mask secrets in the rendered line too."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_processor,
    ]


def configure_logging(
    format: str | None = None,  # noqa: A002 - the documented keyword
    level: str | int = "INFO",
    *,
    stream: TextIO | None = None,
) -> None:
    """Log through structlog, as ``"console"`` or ``"json"`` lines.

    ``format`` defaults to ``LLMTRAIL_LOG_FORMAT`` and then ``"console"``; ``stream`` to
    stderr. Both structlog loggers and stdlib loggers (SQLAlchemy, OTel ...) are formatted.
    """
    chosen = (format or os.environ.get(LOG_FORMAT_ENV) or "console").strip().lower()
    if chosen not in _FORMATS:
        source = "format" if format else LOG_FORMAT_ENV
        raise ConfigurationError(f"{source}={chosen!r} is invalid: use 'console' or 'json'")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ConfigurationError(
            f"level={level!r} is invalid: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    output = stream if stream is not None else sys.stderr
    renderer: Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(output, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(colors=colors)

    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure_logging() must reach loggers made before it.
        cache_logger_on_first_use=False,
    )
    formatter = _RedactingFormatter(
        # Records from stdlib loggers get the same chain, plus their `extra={...}` fields.
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric)

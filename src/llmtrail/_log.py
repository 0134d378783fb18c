"""Loggers for llmtrail's own modules: structlog's call style, output chosen by the application.

Invariants:
- A library is silent: importing this module adds a ``NullHandler`` to the ``llmtrail``
  logger and nothing else, so nothing is printed (not even warnings through logging's
  last-resort handler) until the application or the CLI configures logging.
- Every module logs through ``get_logger(__name__)``: a stdlib ``logging.Logger`` named by the
  module (``llmtrail.storage._migrate`` ...), so ``logging`` settings (levels, handlers,
  filters) silence or route it like any other library's logs.
- Keywords become ``extra`` fields of the ``LogRecord``; structlog's ``ProcessorFormatter``
  (what :func:`llmtrail.telemetry.configure_logging` installs) renders them as key=value or
  JSON, and the ids the pipeline binds with ``structlog.contextvars`` are merged in.
- When the application has configured structlog itself (``structlog.configure``, or
  ``structlog.testing.capture_logs``), the records follow that configuration instead: the
  application's structlog pipeline sees llmtrail's events as its own. llmtrail never calls
  ``structlog.configure`` outside :func:`~llmtrail.telemetry.configure_logging`.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["LibraryLogger", "get_logger"]

# LogRecord's own attributes: an `extra` key with one of these names would raise KeyError.
_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _to_log_kwargs(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    for key in [k for k in event_dict if k in _RESERVED and k not in ("exc_info", "stack_info")]:
        event_dict[f"{key}_"] = event_dict.pop(key)
    return structlog.stdlib.render_to_log_kwargs(logger, method, event_dict)


class LibraryLogger:
    """structlog's logging methods (``info("event", key=value)``) for one llmtrail module."""

    __slots__ = ("_name", "_stdlib")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = structlog.stdlib.BoundLogger(
            logging.getLogger(name),
            [
                # Cheap exit when the level is off, before any other work.
                structlog.stdlib.filter_by_level,
                structlog.contextvars.merge_contextvars,
                _to_log_kwargs,
            ],
            {},
        )

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(self._name)
        return self._stdlib

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the current exception's traceback."""
        self._target().exception(event, **fields)


def get_logger(name: str) -> LibraryLogger:
    """The logger of the module ``name`` (pass ``__name__``)."""
    return LibraryLogger(name)


logging.getLogger("llmtrail").addHandler(logging.NullHandler())

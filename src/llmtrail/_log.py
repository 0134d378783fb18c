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
- Importing this module does not import structlog (about 0.1 s with rich): a structlog that
  is not imported is neither configured nor holding bound ids, so it is looked up in
  ``sys.modules`` when a record is logged, never imported here.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

__all__ = ["LibraryLogger", "get_logger"]

# LogRecord's own attributes: an `extra` key with one of these names would raise KeyError.
_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class LibraryLogger:
    """structlog's logging methods (``info("event", key=value)``) for one llmtrail module."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        structlog = sys.modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            method = "exception" if exc_info else logging.getLevelName(level).lower()
            getattr(structlog.get_logger(self._name), method)(event, **fields)
            return
        logger = logging.getLogger(self._name)  # a dict lookup: no state held here
        if not logger.isEnabledFor(level):  # the cheap exit, before any other work
            return
        bound = structlog.contextvars.get_contextvars() if structlog is not None else {}
        extra = {**bound, **fields}
        for key in [k for k in extra if k in _RESERVED]:
            extra[f"{key}_"] = extra.pop(key)
        # stacklevel 3: the record names the line that called info()/warning(), not this one.
        logger.log(level, event, extra=extra, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the current exception's traceback."""
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str) -> LibraryLogger:
    """The logger of the module ``name`` (pass ``__name__``)."""
    return LibraryLogger(name)


logging.getLogger("llmtrail").addHandler(logging.NullHandler())

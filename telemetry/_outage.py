"""A span exporter that reports a collector outage once, and does not keep hammering it.

Why: the OTLP exporter retries each batch with backoff for up to its timeout and logs every
retry and every failed batch. With the collector down, a busy application then prints a
warning per batch, and each flush waits out the whole retry schedule again.

Invariants:
- :class:`OutageAwareExporter` is a plain ``SpanExporter`` around another one (public API
  only): spans, results and shutdown pass through unchanged while the collector answers.
- The first failed export starts an outage: one warning names the endpoint and the
  exporter's own reason. While it lasts, batches are dropped at once (``FAILURE``, no network)
  except one probe every ``retry_after_s``; the first successful export ends it with one info
  line counting the spans dropped. Spans are not lost for good: the event store keeps the
  calls, and ``llmtrail traces export`` resends them.
- The wrapped exporter's own log records are kept off the output while *this* exporter calls
  it (a filter scoped to that thread and moment, on the exporter modules' loggers); records of
  any other exporter in the process are untouched.
- Time comes from ``clock`` (monotonic seconds), so tests drive it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["DEFAULT_RETRY_AFTER_S", "OutageAwareExporter"]

_log = structlog.get_logger(__name__)

DEFAULT_RETRY_AFTER_S = 5.0

# The loggers the OTLP exporters write their retry and failure lines to.
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.common.http",
)


class _Muted(threading.local):
    active = False
    last: str | None = None


_muted = _Muted()


class _MuteWhileExporting(logging.Filter):
    """Drops records logged on the thread where an OutageAwareExporter is exporting (and
    remembers the last one: it is the reason given in the outage warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _muted.active:
            return True
        _muted.last = record.getMessage()
        return False


_filter = _MuteWhileExporting()
_installed = False
_install_lock = threading.Lock()


def _install_filter() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            for name in _EXPORTER_LOGGERS:
                logging.getLogger(name).addFilter(_filter)
            _installed = True


class OutageAwareExporter(SpanExporter):
    """``exporter`` with one warning per collector outage (see the module docstring)."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        endpoint: str = "the OTLP endpoint",
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exporter = exporter
        self._endpoint = endpoint
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._down = False
        self._next_probe = 0.0
        self._dropped = 0
        self._lock = threading.Lock()
        _install_filter()

    @property
    def down(self) -> bool:
        """Whether an outage is going on (the last export failed)."""
        return self._down

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._down and self._clock() < self._next_probe:
                self._dropped += len(spans)
                return SpanExportResult.FAILURE
        _muted.active, _muted.last = True, None
        try:
            result = self.exporter.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            _muted.last = f"{type(exc).__name__}: {exc}"
            result = SpanExportResult.FAILURE
        finally:
            _muted.active = False
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                if self._down:
                    _log.info(
                        "OTLP collector reachable again; spans of the outage were dropped",
                        endpoint=self._endpoint,
                        dropped_spans=self._dropped,
                    )
                self._down, self._dropped = False, 0
                return result
            self._dropped += len(spans)
            self._next_probe = self._clock() + self._retry_after_s
            if not self._down:
                self._down = True
                _log.warning(
                    f"OTLP collector at {self._endpoint} is not taking spans; they are "
                    f"dropped until it answers again (tried every {self._retry_after_s:g}s). "
                    "The event store keeps the calls: `llmtrail traces export` resends them",
                    reason=_muted.last,
                )
            return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)

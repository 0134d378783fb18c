"""A span exporter that reports a collector outage once, and does not keep hammering it.

Why: the OTLP exporter retries each batch with backoff for up to its timeout and logs every
retry and every failed batch. With the collector down, a busy application then prints a
warning per batch, and each flush waits out the whole retry schedule again.

Invariants:
- :class:`OutageAwareExporter` is a plain ``SpanExporter`` around another one (public API
  only): spans, results and shutdown pass through unchanged while the collector answers.
- The first failed export starts an outage: while it lasts, batches are dropped at once
  (``FAILURE``, no network) except one probe every ``retry_after_s``; the first successful
  export ends it.
- One warning per outage of a collector (:data:`outages`, keyed by its endpoint): whoever
  notices first (this exporter, the metric exporter, or a tracing sink whose flush overran or
  whose exporters complained) says it, with the reason; the end of the outage is one info
  line. Spans are not lost for good: the event store keeps the calls, and
  ``llmtrail traces export`` resends them.
- The wrapped exporter's own log records are kept off the output while *this* exporter calls
  it, and while a tracing sink flushes or closes (:func:`exporter_logs_muted`: a filter
  scoped to that thread and moment, on the OTLP exporter modules' loggers); records of any
  other export in the process are untouched.
- Time comes from ``clock`` (monotonic seconds), so tests drive it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from llmtrail._log import get_logger

__all__ = ["DEFAULT_RETRY_AFTER_S", "OutageAwareExporter", "exporter_logs_muted", "outages"]

_log = get_logger(__name__)

DEFAULT_RETRY_AFTER_S = 5.0

# The loggers the OTLP exporters write their retry and failure lines to.
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.common.http",
)


class _Muted(threading.local):
    active = False
    first: str | None = None  # the first record dropped: why the export failed


_muted = _Muted()


class _MuteWhileExporting(logging.Filter):
    """Drops the exporters' records on a thread inside :func:`exporter_logs_muted` (and keeps
    the first one, which names the cause: it is the reason in the outage warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _muted.active:
            return True
        if _muted.first is None:
            _muted.first = record.getMessage()
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


class _Outages:
    """Which collectors are not taking telemetry from this process: one warning per outage
    of each (``where`` is its endpoint, ``None`` for one llmtrail did not configure)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str | None] = set()

    def is_down(self, where: str | None) -> bool:
        return where in self._down

    def forget(self) -> None:
        """No outage known any more (for tests)."""
        with self._lock:
            self._down.clear()

    def failed(self, where: str | None, reason: str | None) -> None:
        with self._lock:
            if where in self._down:
                return
            self._down.add(where)
        at = f" at {where}" if where else ""
        _log.warning(
            f"OTLP collector{at} is not taking telemetry; spans are dropped until it "
            "answers again, and the calls are not slowed. The event store keeps the calls: "
            "`llmtrail traces export` resends their spans",
            reason=reason,
        )

    def recovered(self, where: str | None, dropped_spans: int = 0) -> None:
        with self._lock:
            if where not in self._down:
                return
            self._down.discard(where)
        _log.info("OTLP collector reachable again", endpoint=where, dropped_spans=dropped_spans)


outages = _Outages()


@contextmanager
def exporter_logs_muted() -> Iterator[_Muted]:
    """Keep the OTLP exporters' records logged on this thread off the output meanwhile; the
    yielded object's ``first`` is the first one dropped (``None``: the exporters said nothing)."""
    _install_filter()
    previous = _muted.active
    _muted.active, _muted.first = True, None
    try:
        yield _muted
    finally:
        _muted.active = previous


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
        with exporter_logs_muted() as muted:
            try:
                result = self.exporter.export(spans)
            except Exception as exc:  # an exporter bug must not kill the export thread
                muted.first = f"{type(exc).__name__}: {exc}"
                result = SpanExportResult.FAILURE
            reason, muted.first = muted.first, None  # reported here, not by an enclosing scope
        dropped = self._dropped
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self._down, self._dropped = False, 0
            else:
                self._down = True
                self._dropped += len(spans)
                self._next_probe = self._clock() + self._retry_after_s
        if result is SpanExportResult.SUCCESS:
            outages.recovered(self._endpoint, dropped)
        else:
            outages.failed(self._endpoint, reason)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)

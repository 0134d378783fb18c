"""OTLP span export in a helper process, so encoding spans never takes the GIL from the app.

Why: encoding a span to OTLP protobuf costs about 35-45 µs of Python per span (a call makes
three), and the BatchSpanProcessor's worker thread runs it under the GIL of the process whose
event loop serves the calls: at a few hundred calls per second that is a tenth of a core taken
from the loop. Flattening the same span to plain tuples and pickling a batch costs a fraction
of that; the helper process rebuilds the spans and runs the real exporter on another core.

Invariants:
- :class:`ProcessSpanExporter` is a SpanExporter: the BatchSpanProcessor batches, queues and
  flushes exactly as before. ``export`` returns the helper's own exporter result for that
  batch, so ``force_flush`` still returns only after the spans were exported (or failed).
- The helper is ``python -m telemetry._export_worker`` started with :mod:`subprocess` (no
  multiprocessing ``spawn``: that would re-import the application's ``__main__``). It reads
  the ``OTEL_*`` variables itself, as the in-process exporter would, from the inherited
  environment. Frames on its stdin/stdout are a 4-byte length and a pickle, written only by
  this module (the helper trusts its parent, which started it).
- Spans cross the pipe with every field the OTLP encoder reads: ids, flags, trace state,
  parent, kind, times, attributes, events, links, status, dropped counts, resource and scope.
- No batch waits for the helper and none is lost: until it is ready (it starts in the
  background at the first export), or when it cannot start, dies or hangs past the export
  timeout, batches are exported in this process with an identical exporter (one warning
  names a failure), and a fresh helper is tried ``_RESTART_AFTER_S`` after a failure.
- A process forked after the helper started (a pre-fork server's worker) forgets it and
  starts its own; it never writes into its parent's pipe.
- ``shutdown`` asks the helper to shut its exporter down and waits for it (then kills it).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import IO, Any

import structlog
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

__all__ = ["ProcessSpanExporter", "flatten_spans", "rebuild_spans"]

_log = structlog.get_logger("llmtrail.telemetry")

_HEADER = struct.Struct(">I")
_READY, _SUCCESS, _FAILURE = b"R", b"S", b"F"
_START_TIMEOUT_S = 30.0
_RESTART_AFTER_S = 5.0
# Time the helper gets beyond its exporter's own timeout (which includes its retries).
_GRACE_S = 5.0

ExporterFactory = Callable[[], SpanExporter]


# --- the wire form of spans -----------------------------------------------------------------


def _context(ctx: SpanContext | None) -> tuple[Any, ...] | None:
    if ctx is None:
        return None
    state = list(ctx.trace_state.items()) if ctx.trace_state else None
    return (ctx.trace_id, ctx.span_id, ctx.is_remote, int(ctx.trace_flags), state)


def _span_context(wire: tuple[Any, ...] | None) -> SpanContext | None:
    if wire is None:
        return None
    trace_id, span_id, remote, flags, state = wire
    return SpanContext(
        trace_id,
        span_id,
        remote,
        TraceFlags(flags),
        TraceState(state) if state else None,
    )


def flatten_spans(spans: Sequence[ReadableSpan]) -> tuple[list[Any], list[Any], list[Any]]:
    """``spans`` as plain tuples: (resources, scopes, spans), the first two deduplicated."""
    resources: list[Any] = []
    scopes: list[Any] = []
    seen_resources: dict[int, int] = {}
    seen_scopes: dict[int, int] = {}
    rows: list[Any] = []
    for span in spans:
        resource = span.resource
        r = seen_resources.get(id(resource))
        if r is None:
            r = seen_resources[id(resource)] = len(resources)
            resources.append((dict(resource.attributes), resource.schema_url))
        scope = span.instrumentation_scope
        s = seen_scopes.get(id(scope))
        if s is None:
            s = seen_scopes[id(scope)] = len(scopes)
            scopes.append(
                None
                if scope is None
                else (scope.name, scope.version, scope.schema_url, dict(scope.attributes or {}))
            )
        status = span.status
        rows.append(
            (
                span.name,
                _context(span.context),
                _context(span.parent),
                span.kind.value,
                span.start_time,
                span.end_time,
                dict(span.attributes) if span.attributes else None,
                [
                    (e.name, dict(e.attributes) if e.attributes else None, e.timestamp)
                    for e in span.events
                ]
                if span.events
                else None,
                [(_context(link.context), dict(link.attributes or {})) for link in span.links]
                if span.links
                else None,
                (status.status_code.value, status.description),
                (span.dropped_attributes, span.dropped_events, span.dropped_links),
                r,
                s,
            )
        )
    return resources, scopes, rows


def _bounded_attributes(values: dict[str, Any] | None, dropped: int) -> Any:
    if not dropped:
        return values
    bounded = BoundedAttributes(attributes=values, immutable=False)
    bounded.dropped = dropped
    return bounded


def _bounded_list(values: list[Any], dropped: int) -> Any:
    if not dropped:
        return values
    bounded = BoundedList.from_seq(len(values), values)
    bounded.dropped = dropped
    return bounded


def rebuild_spans(resources: list[Any], scopes: list[Any], rows: list[Any]) -> list[ReadableSpan]:
    """The inverse of :func:`flatten_spans`: ReadableSpans the OTLP encoder reads identically."""
    built_resources = [Resource(attrs, schema_url) for attrs, schema_url in resources]
    built_scopes = [
        None if scope is None else InstrumentationScope(scope[0], scope[1], scope[2], scope[3])
        for scope in scopes
    ]
    spans: list[ReadableSpan] = []
    for (
        name,
        context,
        parent,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        (status_code, description),
        (dropped_attributes, dropped_events, dropped_links),
        r,
        s,
    ) in rows:
        span_events = [SpanEvent(n, a, timestamp=t) for n, a, t in events or ()]
        span_links = [Link(_span_context(c), a) for c, a in links or ()]  # type: ignore[arg-type]
        spans.append(
            ReadableSpan(
                name=name,
                context=_span_context(context),
                parent=_span_context(parent),
                resource=built_resources[r],
                attributes=_bounded_attributes(attributes, dropped_attributes),
                events=_bounded_list(span_events, dropped_events),
                links=_bounded_list(span_links, dropped_links),
                kind=SpanKind(kind),
                status=Status(StatusCode(status_code), description),
                start_time=start,
                end_time=end,
                instrumentation_scope=built_scopes[s],
            )
        )
    return spans


# --- framing --------------------------------------------------------------------------------


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the pipe closed")
        data += chunk
    return data


def _read_frame(stream: IO[bytes]) -> bytes:
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return _read_exact(stream, size)


# --- the parent side ------------------------------------------------------------------------


class ProcessSpanExporter(SpanExporter):
    """Exports in a helper process with the exporter ``factory`` builds there.

    ``factory`` must be picklable (a module-level function or a ``functools.partial`` of
    one); ``fallback`` (else one more ``factory()``) exports in this process whenever the
    helper is not ready: while it starts (in the background, at the first export: about a
    second of imports, during which nothing waits), after it failed, and after shutdown
    began. ``timeout_s`` bounds one export, the helper's exporter retries included.
    """

    def __init__(
        self,
        factory: ExporterFactory,
        *,
        timeout_s: float = 10.0,
        fallback: SpanExporter | None = None,
    ) -> None:
        self._factory = factory
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one export at a time; guards the fields below
        self._process: subprocess.Popen[bytes] | None = None
        self._starting: threading.Thread | None = None
        self._failed_at: float | None = None
        self._fallback = fallback
        self._shut_down = False
        self._warned = False
        if hasattr(os, "register_at_fork"):
            # A forked child (a pre-fork server's worker) must not write into its parent's
            # helper pipe: it forgets the helper and starts its own at its first export.
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_helper(ref))

    @property
    def helper_pid(self) -> int | None:
        """The helper process's pid while it serves (for tests and benchmarks)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def wait_until_ready(self, timeout_s: float = _START_TIMEOUT_S) -> bool:
        """Start the helper if needed and wait for it; whether it serves (tests, benchmarks)."""
        with self._lock:
            self._start_if_needed()
            starting = self._starting
        if starting is not None:
            starting.join(timeout_s)
        return self.helper_pid is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            process = None if self._shut_down else self._start_if_needed()
            if process is not None:
                try:
                    return self._export_in(process, spans)
                except (OSError, EOFError, TimeoutError, pickle.PickleError) as exc:
                    self._lost(f"{type(exc).__name__}: {exc}")
            return self._in_process().export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # export() is synchronous: nothing is held here

    def shutdown(self) -> None:
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            starting = self._starting
        if starting is not None:
            starting.join(_START_TIMEOUT_S)
        with self._lock:
            process, self._process = self._process, None
            if process is not None:
                self._stop(process)
            if self._fallback is not None:
                self._fallback.shutdown()

    # -- internals (called with the lock held) ------------------------------------------

    def _start_if_needed(self) -> subprocess.Popen[bytes] | None:
        """The serving helper, or ``None`` (then one is started, unless one is starting or
        the last one failed less than ``_RESTART_AFTER_S`` ago)."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                return process
            self._lost(f"the export helper exited (code {process.returncode})")
        if self._starting is not None or self._shut_down or os.name != "posix":
            return None  # select() on pipes is POSIX-only: elsewhere, export in process
        if self._failed_at is not None and time.monotonic() - self._failed_at < _RESTART_AFTER_S:
            return None
        self._starting = threading.Thread(
            target=self._start, name="llmtrail-otlp-helper-start", daemon=True
        )
        self._starting.start()
        return None

    def _start(self) -> None:
        """Start a helper and hand it over once it is ready (runs in its own thread)."""
        process: subprocess.Popen[bytes] | None = None
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "telemetry._export_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
            assert process.stdin is not None
            _write_frame(process.stdin, pickle.dumps(self._factory))
            if _reply(process, _START_TIMEOUT_S) != _READY:
                raise EOFError("the export helper could not build its exporter")
        except (OSError, EOFError, TimeoutError, pickle.PickleError) as exc:
            if process is not None:
                self._stop(process)
            with self._lock:
                self._starting = None
                self._lost(f"the export helper did not start: {exc}")
            return
        with self._lock:
            self._starting = None
            if self._shut_down:
                self._stop(process)
            else:
                self._process = process
                self._failed_at = None

    def _export_in(
        self, process: subprocess.Popen[bytes], spans: Sequence[ReadableSpan]
    ) -> SpanExportResult:
        assert process.stdin is not None
        payload = pickle.dumps(flatten_spans(spans), protocol=pickle.HIGHEST_PROTOCOL)
        _write_frame(process.stdin, payload)
        reply = _reply(process, self._timeout_s + _GRACE_S)
        return SpanExportResult.SUCCESS if reply == _SUCCESS else SpanExportResult.FAILURE

    def _lost(self, reason: str) -> None:
        process, self._process = self._process, None
        if process is not None:
            self._stop(process)
        self._failed_at = time.monotonic()
        if not self._warned:
            self._warned = True
            _log.warning(
                "OTLP export helper unavailable; exporting spans in this process",
                reason=reason,
                retry_after_s=_RESTART_AFTER_S,
            )

    def _in_process(self) -> SpanExporter:
        if self._fallback is None:
            self._fallback = self._factory()
        return self._fallback

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        try:
            if process.stdin is not None and process.poll() is None:
                _write_frame(process.stdin, b"")
            process.wait(timeout=self._timeout_s + _GRACE_S)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        finally:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    # The helper may have died with bytes unread: nothing to keep then.
                    with contextlib.suppress(OSError):
                        stream.close()


def _forget_helper(ref: weakref.ref[ProcessSpanExporter]) -> None:
    exporter = ref()
    if exporter is None:
        return
    exporter._lock = threading.Lock()  # it may have been held by another thread at fork
    exporter._starting = None
    process, exporter._process = exporter._process, None
    if process is not None:  # our copies of the parent's pipe ends; its helper lives on
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _reply(process: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"the export helper gave no answer within {timeout_s:.0f} s")
    reply = process.stdout.read(1)
    if not reply:
        raise EOFError(f"the export helper exited (code {process.poll()})")
    return reply


# --- the helper side ------------------------------------------------------------------------


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    try:
        factory = pickle.loads(_read_frame(stdin))
    except EOFError:
        return 0  # the parent went away before it said what to build
    try:
        exporter: SpanExporter = factory()
    except Exception as exc:  # report it to the parent, which falls back
        print(f"llmtrail export helper: cannot build the exporter: {exc}", file=sys.stderr)
        stdout.write(_FAILURE)
        stdout.flush()
        return 1
    stdout.write(_READY)
    stdout.flush()
    try:
        while True:
            try:
                frame = _read_frame(stdin)
            except EOFError:
                return 0  # the parent is gone
            if not frame:
                return 0  # shutdown asked
            try:
                result = exporter.export(rebuild_spans(*pickle.loads(frame)))
            except Exception as exc:
                print(f"llmtrail export helper: export failed: {exc}", file=sys.stderr)
                result = SpanExportResult.FAILURE
            stdout.write(_SUCCESS if result is SpanExportResult.SUCCESS else _FAILURE)
            stdout.flush()
    finally:
        exporter.shutdown()


def main() -> int:
    """The helper's entry point (``python -m telemetry._export_worker``)."""
    # Ctrl-C reaches the whole process group: the parent decides when the helper stops (it
    # closes the pipe, or sends the empty frame) so that its last batch is still exported.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The frames own the real stdout; anything else printed (a library's print) goes to stderr.
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return _serve(sys.stdin.buffer, frames_out)

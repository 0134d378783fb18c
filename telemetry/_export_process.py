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
- The helper is ``python -m llmtrail.telemetry._export_worker`` started with :mod:`subprocess` (no
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
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

from ._bundle import (
    METRICS_ONLY,
    SPANS,
    SPANS_AND_METRICS,
    CallBundle,
    flatten_bundles,
    rebuild_bundles,
    record_call_metrics,
    spans_of,
)
from ._metrics import GenAIMetrics

__all__ = ["ProcessSpanExporter", "flatten_spans", "rebuild_spans"]

_log = structlog.get_logger(__name__)

_HEADER = struct.Struct(">I")
_READY, _SUCCESS, _FAILURE = b"R", b"S", b"F"
_START_TIMEOUT_S = 30.0
_RESTART_AFTER_S = 5.0
# Time the helper gets beyond its exporter's own timeout (which includes its retries).
_GRACE_S = 5.0

ExporterFactory = Callable[[], SpanExporter]
MeterProviderFactory = Callable[[], SDKMeterProvider]


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

    Besides spans, a batch may hold :class:`CallBundle` items (a finished call's events,
    queued by the tracing sink): the helper builds their spans, and records their GenAI
    metrics on the meter provider ``metrics_factory`` builds there (see
    :meth:`record_metrics_with`). Metric points are recorded in exactly one process: in the
    helper while helpers serve, in this process from the first helper failure on (one
    series, never two processes writing it at once); calls finished while the first helper
    starts keep their metric points here until it serves.
    """

    def __init__(
        self,
        factory: ExporterFactory,
        *,
        timeout_s: float = 10.0,
        fallback: SpanExporter | None = None,
        metrics_factory: MeterProviderFactory | None = None,
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
        self._metrics_factory = metrics_factory
        # Metric points go to helpers until one fails; then they stay in this process.
        self._metrics_remote = True
        self._helper_metrics = False  # the serving helper has built its meter provider
        self._held: list[CallBundle] = []  # calls whose metric points wait for a helper
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

    def record_metrics_with(self, factory: MeterProviderFactory) -> None:
        """Let helpers record the GenAI metrics of call bundles on ``factory()``'s provider.

        ``factory`` must be picklable and build a provider equal to the in-process one the
        bundles' sink would use (same exporter settings and resource).
        """
        with self._lock:
            self._metrics_factory = factory
            self._helper_metrics = False  # a serving helper is told at the next export

    def start_soon(self) -> None:
        """Start the helper in the background now, rather than at the first export."""
        with self._lock:
            self._start_if_needed()

    def wait_until_ready(self, timeout_s: float = _START_TIMEOUT_S) -> bool:
        """Start the helper if needed and wait for it; whether it serves (tests, benchmarks)."""
        with self._lock:
            self._start_if_needed()
            starting = self._starting
        if starting is not None:
            starting.join(timeout_s)
        return self.helper_pid is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        plain: list[ReadableSpan] = []
        bundles: list[CallBundle] = []
        for item in spans:
            if isinstance(item, CallBundle):
                bundles.append(item)
            else:
                plain.append(item)
        with self._lock:
            process = None if self._shut_down else self._start_if_needed()
            if process is not None:
                try:
                    return self._export_in(process, plain, bundles)
                except (OSError, EOFError, TimeoutError, pickle.PickleError) as exc:
                    self._lost(f"{type(exc).__name__}: {exc}")
            return self._export_here(plain, bundles)

    def flush_metrics(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Export the metric points recorded so far (in the helper, or held for it)."""
        with self._lock:
            self._start_if_needed()
            starting = self._starting
        if starting is not None:
            starting.join(timeout_s)  # points held for the first helper go there
        with self._lock:
            process = None if self._shut_down else self._start_if_needed()
            if process is not None:
                try:
                    if self._held:
                        self._export_in(process, [], [])
                    if self._helper_metrics:
                        _write_frame(process.stdin, _dumps(("flush",)))  # type: ignore[arg-type]
                        _reply(process, self._timeout_s + _GRACE_S)
                    return
                except (OSError, EOFError, TimeoutError, pickle.PickleError) as exc:
                    self._lost(f"{type(exc).__name__}: {exc}")
            self._record_held_here()

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
                if self._held:
                    # On failure they are recorded here, just below.
                    with contextlib.suppress(OSError, EOFError, TimeoutError, pickle.PickleError):
                        self._export_in(process, [], [])
                self._stop(process)
            self._metrics_remote = False
            self._record_held_here()
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
        if self._starting is not None or self._shut_down:
            return None
        if os.name != "posix":
            self._metrics_remote = False  # select() on pipes is POSIX-only: no helper here
            return None
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
                # -P: the working directory is not put first on sys.path, so a directory
                # of the application's own named "telemetry" cannot shadow this package;
                # the package's own root goes first instead (the helper runs this code).
                [sys.executable, "-P", "-m", "llmtrail.telemetry._export_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                env=_helper_environment(),
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
                self._helper_metrics = False

    def _helper_records_metrics(self, process: subprocess.Popen[bytes]) -> bool:
        """Whether metric points go to ``process`` (telling it how to record them first)."""
        if not self._metrics_remote or self._metrics_factory is None:
            return False
        if not self._helper_metrics:
            assert process.stdin is not None
            _write_frame(process.stdin, _dumps(("metrics", self._metrics_factory)))
            if _reply(process, _START_TIMEOUT_S) != _READY:
                self._metrics_remote = False
                self._warn(
                    "OTLP export helper cannot record metrics; recording them in this process"
                )
                return False
            self._helper_metrics = True
        return True

    def _export_in(
        self,
        process: subprocess.Popen[bytes],
        spans: Sequence[ReadableSpan],
        bundles: Sequence[CallBundle],
    ) -> SpanExportResult:
        assert process.stdin is not None
        calls: list[tuple[CallBundle, int]] = []
        if bundles or self._held:
            remote = self._helper_records_metrics(process)
            if remote:
                calls.extend((bundle, METRICS_ONLY) for bundle in self._held)
            for bundle in bundles:
                target = bundle.target
                if target.metrics is None:
                    if bundle.spans:
                        calls.append((bundle, SPANS))
                elif remote:
                    calls.append((bundle, SPANS_AND_METRICS if bundle.spans else METRICS_ONLY))
                else:
                    record_call_metrics(target.metrics, bundle.events)
                    if bundle.spans:
                        calls.append((bundle, SPANS))
            if not remote:
                self._record_held_here()
        payload = _dumps(("export", flatten_spans(spans), flatten_bundles(calls)))
        _write_frame(process.stdin, payload)
        reply = _reply(process, self._timeout_s + _GRACE_S)
        self._held.clear()  # the helper has them now, whatever its exporter answered
        return SpanExportResult.SUCCESS if reply == _SUCCESS else SpanExportResult.FAILURE

    def _export_here(
        self, spans: Sequence[ReadableSpan], bundles: Sequence[CallBundle]
    ) -> SpanExportResult:
        """Export in this process: bundles become spans here; their metric points are
        recorded here too, unless the first helper is still starting (then they wait)."""
        out = list(spans)
        hold = self._metrics_remote and self._metrics_factory is not None and not self._shut_down
        for bundle in bundles:
            target = bundle.target
            try:
                if bundle.spans:
                    out.extend(spans_of(bundle.events, target.resource, target.scope, target.info))
            except Exception:
                _log.exception("could not trace a call", call_id=bundle.events[-1].call_id)
            if target.metrics is not None:
                if hold:
                    self._held.append(bundle)
                else:
                    record_call_metrics(target.metrics, bundle.events)
        if not hold:
            self._record_held_here()
        return self._in_process().export(out) if out else SpanExportResult.SUCCESS

    def _record_held_here(self) -> None:
        held, self._held = self._held, []
        for bundle in held:
            if bundle.target.metrics is not None:
                record_call_metrics(bundle.target.metrics, bundle.events)

    def _lost(self, reason: str) -> None:
        process, self._process = self._process, None
        if process is not None:
            self._stop(process)
        self._failed_at = time.monotonic()
        # The lost helper's unexported points are gone with it; from here on every point is
        # recorded in this process, so that no two processes ever write the same series.
        self._metrics_remote = False
        self._helper_metrics = False
        self._warn("OTLP export helper unavailable; exporting spans in this process", reason)

    def _warn(self, message: str, reason: str | None = None) -> None:
        if not self._warned:
            self._warned = True
            _log.warning(message, reason=reason, retry_after_s=_RESTART_AFTER_S)

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


def _helper_environment() -> dict[str, str]:
    """This environment, with the directory this package was imported from first on
    ``PYTHONPATH``: the helper imports the very code of its parent."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not inherited else os.pathsep.join((root, inherited))
    return env


def _dumps(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _forget_helper(ref: weakref.ref[ProcessSpanExporter]) -> None:
    exporter = ref()
    if exporter is None:
        return
    exporter._lock = threading.Lock()  # it may have been held by another thread at fork
    exporter._starting = None
    exporter._helper_metrics = False
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


class _Helper:
    """The helper's state: its span exporter and, once asked for, its GenAI metrics."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.meter_provider: SDKMeterProvider | None = None
        self.metrics: GenAIMetrics | None = None

    def handle(self, message: tuple[Any, ...]) -> bytes:
        kind = message[0]
        if kind == "export":
            return self.export(message[1], message[2])
        if kind == "metrics":
            try:
                provider = message[1]()
                metrics = GenAIMetrics(provider)
            except Exception as exc:
                print(f"llmtrail export helper: cannot record metrics: {exc}", file=sys.stderr)
                return _FAILURE
            if self.meter_provider is not None:
                self.meter_provider.shutdown()
            self.meter_provider, self.metrics = provider, metrics
            return _READY
        if kind == "flush":
            if self.meter_provider is not None:
                self.meter_provider.force_flush()
            return _SUCCESS
        raise ValueError(f"unknown message {kind!r}")

    def export(self, span_wire: tuple[Any, ...], call_wire: tuple[Any, ...]) -> bytes:
        spans = rebuild_spans(*span_wire)
        for call in rebuild_bundles(*call_wire):
            try:
                if call.flag != METRICS_ONLY:
                    spans.extend(spans_of(call.events, call.resource, call.scope, None))
                if call.flag != SPANS and self.metrics is not None:
                    record_call_metrics(self.metrics, call.events)
            except Exception as exc:  # one bad call must not cost the batch its spans
                print(f"llmtrail export helper: cannot trace a call: {exc}", file=sys.stderr)
        if not spans:
            return _SUCCESS
        try:
            result = self.exporter.export(spans)
        except Exception as exc:
            print(f"llmtrail export helper: export failed: {exc}", file=sys.stderr)
            return _FAILURE
        return _SUCCESS if result is SpanExportResult.SUCCESS else _FAILURE

    def shutdown(self) -> None:
        self.exporter.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()  # exports the last metric points


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    try:
        factory = pickle.loads(_read_frame(stdin))
    except EOFError:
        return 0  # the parent went away before it said what to build
    try:
        helper = _Helper(factory())
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
            stdout.write(helper.handle(pickle.loads(frame)))
            stdout.flush()
    finally:
        helper.shutdown()


def main() -> int:
    """The helper's entry point (``python -m llmtrail.telemetry._export_worker``)."""
    # Ctrl-C reaches the whole process group: the parent decides when the helper stops (it
    # closes the pipe, or sends the empty frame) so that its last batch is still exported.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The frames own the real stdout; anything else printed (a library's print) goes to stderr.
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return _serve(sys.stdin.buffer, frames_out)

"""The httpx instrumentation's span, recorded as plain fields straight into the export queue.

Why: the OpenTelemetry httpx instrumentation makes one CLIENT span per request. On the SDK's
Span that costs about 290k instructions per request (measured with callgrind against an
in-memory transport): a lock and a cleaning pass per attribute, a BoundedList per span, a
processor fan-out at start and end, and a copy of the whole span at ``end()``. The same span
kept as plain fields, and handed to the batch processor as it is, costs a fraction of that.
The instrumentation itself is unchanged: it still decides every name, attribute and status.

Invariants:
- :class:`HttpTracerProvider` gives the instrumentation a tracer whose spans are
  :class:`_HttpSpan` only while ``route_open()`` holds: the provider's one span processor is
  llmtrail's batch processor, its sampler is the default always-on one, and no attribute
  length limit is set (the tracing sink checks these). Otherwise, and for spans with links or
  under an unsampled parent, every call goes to the SDK tracer unchanged.
- An :class:`_HttpSpan` is what the SDK would have exported: same parent, kind, times, scope,
  resource, attributes (cleaned and bounded by the same ``SpanLimits`` through the SDK's own
  ``BoundedAttributes`` whenever a value is not a plain str/bool/int/float or the count is
  over the limit), events (``record_exception`` is the SDK's own), status rules and ids from
  the provider's id generator. ``start_as_current_span`` behaves as ``trace.use_span``.
- After ``end()`` the span is frozen: later changes are ignored, as the SDK ignores them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from types import TracebackType
from typing import Any, cast

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, Tracer
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util import types

__all__ = ["HttpTracerProvider"]

_logger = logging.getLogger(__name__)
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_PLAIN = (str, bool, int, float)


class HttpTracerProvider(trace.TracerProvider):
    """``provider``'s tracers, recording lightly while ``route_open()`` (see module doc)."""

    def __init__(
        self,
        provider: SDKTracerProvider,
        processor: SpanProcessor,
        route_open: Callable[[], bool],
        limits: SpanLimits,
    ) -> None:
        self._provider = provider
        self._how = _How(processor, route_open, limits)

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        sdk = self._provider.get_tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        if not isinstance(sdk, Tracer):
            return sdk  # a disabled provider's no-op tracer
        scope = InstrumentationScope(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        return _HttpTracer(sdk, scope, self._how)


@dataclass(slots=True, frozen=True)
class _How:
    """Where light spans go, when they may be made, and their limits."""

    processor: SpanProcessor
    route_open: Callable[[], bool]
    limits: SpanLimits


class _HttpTracer(trace.Tracer):
    def __init__(self, sdk: Tracer, scope: InstrumentationScope, how: _How) -> None:
        self._sdk = sdk
        self._scope = scope
        self._how = how

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        sampled_parent = parent.is_valid and parent.trace_flags.sampled
        how = self._how
        if links or not how.route_open() or (parent.is_valid and not sampled_parent):
            return self._sdk.start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        ids = self._sdk.id_generator
        span_context = SpanContext(
            parent.trace_id if sampled_parent else ids.generate_trace_id(),
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=_SAMPLED,
            trace_state=parent.trace_state,
        )
        return _HttpSpan(
            name,
            span_context,
            parent if sampled_parent else None,
            kind,
            dict(attributes) if attributes else {},
            start_time if start_time is not None else time_ns(),
            self._sdk.resource,
            self._scope,
            how.processor,
            how.limits,
            record_exception,
            set_status_on_exception,
        )

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _Current:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        return _Current(span, end_on_exit, record_exception, set_status_on_exception)


class _Current:
    """``trace.use_span(span, end_on_exit, ...)`` as a plain context manager."""

    __slots__ = ("_span", "_end", "_record", "_status", "_token")

    def __init__(self, span: trace.Span, end: bool, record: bool, status: bool) -> None:
        self._span, self._end, self._record, self._status = span, end, record, status

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        context_api.detach(self._token)
        try:
            # Like use_span: only Exception subclasses are errors (not GeneratorExit & co).
            if isinstance(exc, Exception) and span.is_recording():
                if self._record:
                    span.record_exception(exc)
                if self._status:
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            if self._end:
                span.end()


class _HttpSpan(trace.Span, ReadableSpan):
    """A recording span kept as plain fields; it is its own ReadableSpan once ended."""

    # The SDK's status rules (borrowed below) take the span's lock; spans of one client
    # are changed by the one thread that sends, so one lock for all of them is enough.
    _lock = threading.Lock()

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_time: int,
        resource: Any,
        scope: InstrumentationScope,
        processor: SpanProcessor,
        limits: SpanLimits,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        ReadableSpan.__init__(
            self,
            name=name,
            context=context,
            parent=parent,
            resource=resource,
            attributes=attributes,
            events=[],
            kind=kind,
            start_time=start_time,
            instrumentation_scope=scope,
        )
        self._processor = processor
        self._limits = limits
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    # --- the API Span -----------------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self._context)

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        attributes = cast(dict[str, Any], self._attributes)
        if key in attributes:
            del attributes[key]  # a new value moves to the end, as in BoundedAttributes
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is not None:
            _logger.warning("Calling add_event() on an ended span.")
            return
        limits = self._limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        attrs = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        self._events.append(Event(name, attrs, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        # The instrumentation never adds links after the start; keep the SDK's data model.
        if self._end_time is not None or not context.is_valid:
            return
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(self._limits.max_links)
        self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is None:
            SDKSpan.set_status(cast(Any, self), status, description)  # the SDK's own rules

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        SDKSpan.record_exception(cast(Any, self), exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._attributes = _bounded(cast(dict[str, Any], self._attributes), self._limits)
        self._processor.on_end(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exception=exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()


def _bounded(attributes: dict[str, Any], limits: SpanLimits) -> Mapping[str, Any]:
    """``attributes`` as the SDK would hold them: the dict itself when every key and value
    is plain and within the limit, else the SDK's BoundedAttributes of it."""
    limit = limits.max_span_attributes
    if (limit is None or len(attributes) <= limit) and all(
        type(value) in _PLAIN and key and type(key) is str for key, value in attributes.items()
    ):
        return attributes
    return BoundedAttributes(
        limit, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
    )

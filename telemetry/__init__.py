"""llmtrail's telemetry: OpenTelemetry spans and GenAI metrics from lifecycle events, traces
rebuilt from the event store, and structlog setup.

Importing this package configures nothing: no provider, exporter or logging handler exists
until :func:`configure`, :func:`configure_logging` or a service (through the ``llmtrail.sinks``
entry point :func:`tracing_sink_from_environment`) asks for one.
"""

from __future__ import annotations

from ._config import configure, reset, tracing_sink_from_environment
from ._export import ExportError, ExportSummary, export_traces, rebuild_spans
from ._logging import configure_logging, redact_processor
from ._redact import redact_text, redact_value
from ._sink import TracingSink
from ._spans import IncompleteCallError, SpanEvent, SpanPlan, plan_call_spans, record_spans

__all__ = [
    "ExportError",
    "ExportSummary",
    "IncompleteCallError",
    "SpanEvent",
    "SpanPlan",
    "TracingSink",
    "configure",
    "configure_logging",
    "export_traces",
    "plan_call_spans",
    "rebuild_spans",
    "record_spans",
    "redact_processor",
    "redact_text",
    "redact_value",
    "reset",
    "tracing_sink_from_environment",
]

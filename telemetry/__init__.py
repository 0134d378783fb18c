"""llmtrail's telemetry: OpenTelemetry spans and GenAI metrics from lifecycle events, traces
rebuilt from the event store, and structlog setup.

Importing this package configures nothing: no provider, exporter or logging handler exists
until :func:`configure`, :func:`configure_logging` or a service (through the ``llmtrail.sinks``
entry point :func:`tracing_sink_from_environment`) asks for one. It imports nothing either:
each name loads with its module on first use, so the CLI's parser (which registers the
``traces`` commands) never loads the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrail._lazy import lazy_names

if TYPE_CHECKING:
    from ._config import configure, reset, tracing_sink_from_environment
    from ._export import ExportError, ExportSummary, export_traces, rebuild_spans
    from ._logging import configure_logging, redact_processor
    from ._redact import redact_text, redact_value
    from ._sink import TracingSink
    from ._spans import IncompleteCallError, SpanEvent, SpanPlan, plan_call_spans, record_spans

_LAZY = {
    "configure": "._config",
    "configure_logging": "._logging",
    "export_traces": "._export",
    "ExportError": "._export",
    "ExportSummary": "._export",
    "IncompleteCallError": "._spans",
    "plan_call_spans": "._spans",
    "rebuild_spans": "._export",
    "record_spans": "._spans",
    "redact_processor": "._logging",
    "redact_text": "._redact",
    "redact_value": "._redact",
    "reset": "._config",
    "SpanEvent": "._spans",
    "SpanPlan": "._spans",
    "tracing_sink_from_environment": "._config",
    "TracingSink": "._sink",
}

__getattr__ = lazy_names(__name__, _LAZY)

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

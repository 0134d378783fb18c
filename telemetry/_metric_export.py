"""The OTLP/HTTP metric exporter llmtrail builds: the SDK's, reporting collector outages once.

Invariants:
- :class:`OutageAwareMetricExporter` is ``OTLPMetricExporter`` itself (a subclass: same
  configuration from the ``OTEL_*`` variables, same temporality and aggregation), whose
  ``export`` keeps the exporter's per-retry log lines off the output and reports a failure to
  the process-wide :data:`outages` (one warning per outage, shared with the span exporter).
- Imported only when a meter provider is built (the exporter pulls in protobuf and requests).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from ._outage import exporter_logs_muted, outages

__all__ = ["OutageAwareMetricExporter"]


class OutageAwareMetricExporter(OTLPMetricExporter):
    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._where = where

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        with exporter_logs_muted() as muted:
            result = super().export(metrics_data, timeout_millis, **kwargs)
            reason, muted.first = muted.first, None  # reported here, not by an enclosing scope
        if result is MetricExportResult.SUCCESS:
            outages.recovered(self._where)
        else:
            outages.failed(self._where, reason)
        return result

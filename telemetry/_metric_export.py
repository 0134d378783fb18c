"""The OTLP metric exporters llmtrail builds: the SDK's, reporting collector outages once.

Invariants:
- :class:`OutageAwareMetricExporter` (OTLP/HTTP) and, when the gRPC exporter is installed,
  :func:`grpc_metric_exporter`'s class are the SDK's ``OTLPMetricExporter`` themselves
  (subclasses: same configuration from the ``OTEL_*`` variables, same temporality and
  aggregation) with :class:`ReportsOutages` put before them: the exporter's per-retry log
  lines stay off the output and a failure is reported to the process-wide :data:`outages`
  (one warning per outage, shared with the span exporter).
- Imported only when a meter provider is built (the exporter pulls in protobuf and requests);
  the gRPC one only when ``grpc`` was asked for.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from ._outage import exporter_logs_muted, outages

__all__ = ["OutageAwareMetricExporter", "ReportsOutages", "grpc_metric_exporter"]


class ReportsOutages(MetricExporter):
    """Put before an SDK metric exporter class: its ``export`` runs with the exporters' own
    log lines muted, and its outcome is reported to :data:`outages`."""

    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._where = where

    def export(self, metrics_data: MetricsData, *args: Any, **kwargs: Any) -> MetricExportResult:
        with exporter_logs_muted() as muted:
            # The exporter class this is put before provides export (the next in the MRO).
            result = super().export(metrics_data, *args, **kwargs)  # type: ignore[safe-super]
            reason, muted.first = muted.first, None  # reported here, not by an enclosing scope
        if result is MetricExportResult.SUCCESS:
            outages.recovered(self._where)
        else:
            outages.failed(self._where, reason)
        return result


class OutageAwareMetricExporter(ReportsOutages, OTLPMetricExporter):
    """The SDK's OTLP/HTTP metric exporter, reporting outages."""


def grpc_metric_exporter(endpoint: str | None, where: str) -> MetricExporter:
    """The OTLP/gRPC metric exporter (``None``: its ``OTEL_*`` variables), outage-aware."""
    from ._metric_export_grpc import OutageAwareGrpcMetricExporter

    return OutageAwareGrpcMetricExporter(endpoint=endpoint, where=where)

"""The OTLP metric exporters llmtrail builds: the SDK's, reporting collector outages once.

Invariants:
- :class:`OutageAwareMetricExporter` (OTLP/HTTP) and, when the gRPC exporter is installed,
  :func:`grpc_metric_exporter`'s class are the SDK's ``OTLPMetricExporter`` themselves
  (subclasses: same configuration from the ``OTEL_*`` variables, same temporality and
  aggregation), whose ``export`` goes through :func:`reported_export`: the exporter's
  per-retry log lines stay off the output and a failure is reported to the process-wide
  :data:`outages` (one warning per outage, shared with the span exporter).
- Imported only when a meter provider is built (the exporter pulls in protobuf and requests);
  the gRPC one only when ``grpc`` was asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from ._outage import exporter_logs_muted, outages

__all__ = ["OutageAwareMetricExporter", "grpc_metric_exporter", "reported_export"]


def reported_export(where: str, export: Callable[[], MetricExportResult]) -> MetricExportResult:
    """Run one ``export`` with the exporters' own log lines muted; report its outcome."""
    with exporter_logs_muted() as muted:
        result = export()
        reason, muted.first = muted.first, None  # reported here, not by an enclosing scope
    if result is MetricExportResult.SUCCESS:
        outages.recovered(where)
    else:
        outages.failed(where, reason)
    return result


class OutageAwareMetricExporter(OTLPMetricExporter):
    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._where = where

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return reported_export(
            self._where,
            lambda: super(OutageAwareMetricExporter, self).export(
                metrics_data, timeout_millis, **kwargs
            ),
        )


def grpc_metric_exporter(endpoint: str | None, where: str) -> MetricExporter:
    """The OTLP/gRPC metric exporter (``None``: its ``OTEL_*`` variables), outage-aware."""
    from ._metric_export_grpc import OutageAwareGrpcMetricExporter

    return OutageAwareGrpcMetricExporter(endpoint=endpoint, where=where)

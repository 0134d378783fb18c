"""The OTLP/gRPC metric exporter, reporting collector outages once (see ``_metric_export``).

Invariant: imported only when the gRPC protocol was asked for and its exporter is installed
(``opentelemetry-exporter-otlp-proto-grpc``, an optional dependency).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found, unused-ignore]
    OTLPMetricExporter,
)
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from ._metric_export import reported_export

__all__ = ["OutageAwareGrpcMetricExporter"]


class OutageAwareGrpcMetricExporter(OTLPMetricExporter):  # type: ignore[misc, unused-ignore]
    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._where = where

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return reported_export(
            self._where,
            lambda: super(OutageAwareGrpcMetricExporter, self).export(
                metrics_data, timeout_millis, **kwargs
            ),
        )

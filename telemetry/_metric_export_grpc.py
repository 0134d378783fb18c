"""The OTLP/gRPC metric exporter, reporting collector outages once (see ``_metric_export``).

Invariant: imported only when the gRPC protocol was asked for and its exporter is installed
(``opentelemetry-exporter-otlp-proto-grpc``, an optional dependency).
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found, unused-ignore]
    OTLPMetricExporter,
)

from ._metric_export import ReportsOutages

__all__ = ["OutageAwareGrpcMetricExporter"]


class OutageAwareGrpcMetricExporter(ReportsOutages, OTLPMetricExporter):  # type: ignore[misc, unused-ignore]
    """The SDK's OTLP/gRPC metric exporter, reporting outages."""

"""Where spans and metrics go: ``telemetry.configure(...)`` or the standard ``OTEL_*`` variables.

Invariants:
- Importing this module configures nothing. State is created only by :func:`configure`.
- :func:`tracing_sink_from_environment` (the ``llmtrail.sinks`` entry point "tracing") decides,
  in this order: ``OTEL_SDK_DISABLED=true`` -> no sink; :func:`configure` was called -> its
  providers; a real SDK TracerProvider is set globally -> that one, kept as it is (the user's
  exporters, sampler and resource); ``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp|console`` -> a new
  provider with a BatchSpanProcessor and that exporter; otherwise ``None`` (tracing off, and
  the request path pays nothing for it).
- A sink shuts down only what it created for itself; providers made by :func:`configure` live
  until the next :func:`configure` or process exit (the SDK flushes them at exit).
- Exporters read their endpoint, headers, timeout and compression from the ``OTEL_*``
  variables themselves; ``OTEL_SERVICE_NAME`` names the service (default ``llmtrail``).
- An OTLP span exporter llmtrail builds runs in a helper process (:mod:`._export_process`)
  unless ``configure(export_process=False)`` or ``LLMTRAIL_OTLP_EXPORT_PROCESS=0``; it is
  built here first, so a bad configuration fails at once, in this process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from llmtrail.pipeline import ConfigurationError

from . import _attributes as A
from ._bundle import OwnSpanProcessors
from ._export_process import ProcessSpanExporter
from ._sink import TracingSink

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["configure", "tracing_sink_from_environment"]

DEFAULT_SERVICE_NAME = "llmtrail"
_PROTOCOLS = ("http/protobuf", "grpc")


@dataclass(slots=True, frozen=True)
class _Configured:
    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    owned: tuple[TracerProvider | SDKMeterProvider, ...]
    # The active span processor of a tracer provider configure() made (None for a user's),
    # and the batch processor it holds.
    span_processor: SpanProcessor | None = None
    batch_processor: BatchSpanProcessor | None = None
    # The export helper records the GenAI metrics on a provider like meter_provider.
    metrics_in_helper: bool = False


_configured: _Configured | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def service_resource(service_name: str | None) -> Resource:
    resource = Resource.create({})  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if service_name:
        return resource.merge(Resource({A.SERVICE_NAME: service_name}))
    current = resource.attributes.get(A.SERVICE_NAME)
    if not isinstance(current, str) or current.startswith("unknown_service"):
        return resource.merge(Resource({A.SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _protocol(explicit: str | None, signal: str) -> str:
    protocol = (
        explicit
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in _PROTOCOLS:
        raise ConfigurationError(
            f"OTLP protocol {protocol!r} is unsupported: use 'http/protobuf' (default) or 'grpc'"
        )
    grpc_module = "opentelemetry.exporter.otlp.proto.grpc"
    if protocol == "grpc" and importlib.util.find_spec(grpc_module) is None:
        raise ConfigurationError(
            "OTLP protocol 'grpc' needs the gRPC exporter: pip install "
            "opentelemetry-exporter-otlp-proto-grpc, or use protocol='http/protobuf'"
        )
    return protocol


def _signal_url(endpoint: str, path: str, protocol: str) -> str:
    """A base endpoint as in OTEL_EXPORTER_OTLP_ENDPOINT -> the signal's URL (HTTP only)."""
    if protocol == "grpc" or endpoint.rstrip("/").endswith(path):
        return endpoint
    return f"{endpoint.rstrip('/')}{path}"


def otlp_span_exporter(
    endpoint: str | None = None, protocol: str | None = None, *, timeout: float | None = None
) -> SpanExporter:
    """An OTLP span exporter; ``None`` arguments let it read the ``OTEL_*`` variables."""
    protocol = _protocol(protocol, "TRACES")
    if protocol == "grpc":
        # Optional dependency: only imported when asked for, and maybe not installed.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found, unused-ignore]
            OTLPSpanExporter as GrpcSpanExporter,
        )

        span_exporter: SpanExporter = GrpcSpanExporter(endpoint=endpoint, timeout=timeout)
        return span_exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = _signal_url(endpoint, "/v1/traces", protocol) if endpoint else None
    return OTLPSpanExporter(endpoint=url, timeout=timeout)


def _otlp_metric_exporter(endpoint: str | None, protocol: str | None) -> MetricExporter:
    protocol = _protocol(protocol, "METRICS")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found, unused-ignore]
            OTLPMetricExporter as GrpcMetricExporter,
        )

        metric_exporter: MetricExporter = GrpcMetricExporter(endpoint=endpoint)
        return metric_exporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    url = _signal_url(endpoint, "/v1/metrics", protocol) if endpoint else None
    return OTLPMetricExporter(endpoint=url)


def _timeout_s() -> float:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        value = os.environ.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                raise ConfigurationError(
                    f"{name}={value!r} is not a number of seconds: set e.g. {name}=10"
                ) from None
    return 10.0


def _export_process_wanted(explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    value = os.environ.get("LLMTRAIL_OTLP_EXPORT_PROCESS", "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(
        f"LLMTRAIL_OTLP_EXPORT_PROCESS={value!r} is invalid: use 1 (export spans from a "
        "helper process, the default) or 0 (export in this process)"
    )


def traces_exporter(
    endpoint: str | None = None, protocol: str | None = None, export_process: bool | None = None
) -> SpanExporter:
    """The OTLP span exporter llmtrail uses: in a helper process unless told otherwise."""
    exporter = otlp_span_exporter(endpoint, protocol)  # fails here on a bad configuration
    if not _export_process_wanted(export_process):
        return exporter
    factory = functools.partial(otlp_span_exporter, endpoint, protocol)
    return ProcessSpanExporter(factory, timeout_s=_timeout_s(), fallback=exporter)


def _new_tracer_provider(
    exporter: SpanExporter, service_name: str | None
) -> tuple[TracerProvider, OwnSpanProcessors, BatchSpanProcessor]:
    """A provider batch-exporting to ``exporter``, its active span processor and the batch one.

    The processors are made here (not left to the provider) so the tracing sink can hand them
    finished spans, or finished calls for the export helper, directly; processors a user adds
    to the provider later join the active one too (and the sink then sends spans only).
    """
    active = OwnSpanProcessors()
    provider = TracerProvider(resource=service_resource(service_name), active_span_processor=active)
    batch = BatchSpanProcessor(exporter)
    provider.add_span_processor(batch)
    return provider, active, batch


def _new_meter_provider(exporter: MetricExporter, service_name: str | None) -> SDKMeterProvider:
    reader = PeriodicExportingMetricReader(exporter)
    return SDKMeterProvider(resource=service_resource(service_name), metric_readers=[reader])


def otlp_meter_provider(
    endpoint: str | None, protocol: str | None, service_name: str | None
) -> SDKMeterProvider:
    """The OTLP meter provider llmtrail builds (also in the export helper, from this recipe)."""
    return _new_meter_provider(_otlp_metric_exporter(endpoint, protocol), service_name)


def _metrics_in_helper(
    exporter: SpanExporter, endpoint: str | None, protocol: str | None, service_name: str | None
) -> bool:
    """Let the export helper (if ``exporter`` uses one) record the GenAI metrics on a provider
    built like ``otlp_meter_provider(endpoint, protocol, service_name)``."""
    if not isinstance(exporter, ProcessSpanExporter):
        return False
    exporter.record_metrics_with(
        functools.partial(otlp_meter_provider, endpoint, protocol, service_name)
    )
    return True


def configure(
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    service_name: str | None = None,
    exporter: SpanExporter | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    export_process: bool | None = None,
) -> TracerProvider:
    """Send llmtrail's spans (and GenAI metrics) somewhere, for every service created after.

    - ``endpoint``: an OTLP base URL such as ``http://localhost:4318`` (``/v1/traces`` and
      ``/v1/metrics`` are appended for http/protobuf); ``None`` reads the ``OTEL_*`` variables.
    - ``protocol``: ``"http/protobuf"`` (default) or ``"grpc"`` (needs
      opentelemetry-exporter-otlp-proto-grpc).
    - ``exporter``: any SpanExporter instead of OTLP (e.g. ``InMemorySpanExporter`` in tests).
    - ``tracer_provider``: use this SDK provider as it is (nothing is added to it).
    - ``meter_provider``: where the metrics go; by default an OTLP one when ``endpoint`` is
      given, else the global one.
    - ``export_process``: run the OTLP span exporter in a helper process (the default, also
      ``LLMTRAIL_OTLP_EXPORT_PROCESS``), so that encoding spans takes no CPU from this one.

    Returns the TracerProvider llmtrail will use. Calling it again replaces the previous
    configuration and shuts down the providers the previous call created.
    """
    global _configured
    if tracer_provider is not None and not isinstance(tracer_provider, TracerProvider):
        raise ConfigurationError(
            f"configure(tracer_provider={tracer_provider!r}) is not an SDK TracerProvider: "
            "pass opentelemetry.sdk.trace.TracerProvider(...), or leave it None"
        )
    if tracer_provider is not None and (exporter is not None or endpoint is not None):
        raise ConfigurationError(
            "configure(tracer_provider=..., exporter/endpoint=...) is ambiguous: add your "
            "exporter to your provider, or pass exporter/endpoint without a provider"
        )
    owned: list[TracerProvider | SDKMeterProvider] = []
    span_processor: SpanProcessor | None = None
    batch: BatchSpanProcessor | None = None
    if tracer_provider is None:
        if exporter is None:
            exporter = traces_exporter(endpoint, protocol, export_process)
        tracer_provider, span_processor, batch = _new_tracer_provider(exporter, service_name)
        owned.append(tracer_provider)
    in_helper = False
    if meter_provider is None and endpoint is not None:
        meter_provider = otlp_meter_provider(endpoint, protocol, service_name)
        owned.append(meter_provider)
        if exporter is not None:
            in_helper = _metrics_in_helper(exporter, endpoint, protocol, service_name)
    if meter_provider is None:
        meter_provider = _global_sdk_meter_provider()
    previous, _configured = (
        _configured,
        _Configured(
            tracer_provider, meter_provider, tuple(owned), span_processor, batch, in_helper
        ),
    )
    if previous is not None:
        for provider in previous.owned:
            provider.shutdown()
    return tracer_provider


def reset() -> None:
    """Forget :func:`configure` (and shut down what it created); for tests and reloads."""
    global _configured
    previous, _configured = _configured, None
    if previous is not None:
        for provider in previous.owned:
            provider.shutdown()


def _global_sdk_tracer_provider() -> TracerProvider | None:
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def _global_sdk_meter_provider() -> SDKMeterProvider | None:
    provider = metrics.get_meter_provider()
    return provider if isinstance(provider, SDKMeterProvider) else None


def _env_exporters(name: str) -> list[str]:
    return [part.strip().lower() for part in os.environ.get(name, "").split(",") if part.strip()]


def _env_span_exporter() -> SpanExporter | None:
    names = _env_exporters("OTEL_TRACES_EXPORTER")
    if "none" in names:
        return None
    for name in names:
        if name not in ("otlp", "console"):
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={name!r} is unsupported by llmtrail: use 'otlp', "
                "'console' or 'none'"
            )
    if "console" in names:
        return ConsoleSpanExporter()
    if (
        "otlp" in names
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return traces_exporter()
    return None


def _env_wants_metrics() -> bool:
    names = _env_exporters("OTEL_METRICS_EXPORTER")
    if "none" in names:
        return False
    return bool(
        "otlp" in names
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )


def tracing_sink_from_environment(*, force: bool = False, **_: object) -> TracingSink | None:
    """The tracing sink the service adds when the user passed none, or ``None`` (tracing off).

    ``force=True`` (the service's ``tracing=True``) turns tracing on even when nothing is
    configured: spans then go by OTLP to ``OTEL_EXPORTER_OTLP_*`` or the OTLP default
    ``http://localhost:4318``. ``OTEL_SDK_DISABLED=true`` still wins: it is the operator's
    switch. Other keyword arguments are accepted and ignored, so the service can pass more
    without breaking this entry point.
    """
    if _truthy("OTEL_SDK_DISABLED"):
        return None
    if _configured is not None:
        return TracingSink(
            tracer_provider=_configured.tracer_provider,
            meter_provider=_configured.meter_provider,
            span_processor=_configured.span_processor,
            batch_processor=_configured.batch_processor,
            metrics_in_helper=_configured.metrics_in_helper,
        )
    global_tracer = _global_sdk_tracer_provider()
    global_meter = _global_sdk_meter_provider()
    if global_tracer is not None:
        return TracingSink(tracer_provider=global_tracer, meter_provider=global_meter)

    span_exporter = _env_span_exporter()
    if span_exporter is None and force and "none" not in _env_exporters("OTEL_TRACES_EXPORTER"):
        span_exporter = traces_exporter()
    meter_provider: MeterProvider | None = global_meter
    owns_meter = False
    if meter_provider is None and _env_wants_metrics():
        meter_provider = otlp_meter_provider(None, None, None)
        owns_meter = True
    if span_exporter is None and meter_provider is None:
        # Nothing asked for telemetry: the common case, decided without building anything.
        return None
    tracer_provider: TracerProvider | None = None
    span_processor: SpanProcessor | None = None
    batch: BatchSpanProcessor | None = None
    in_helper = False
    if span_exporter is not None:
        tracer_provider, span_processor, batch = _new_tracer_provider(span_exporter, None)
        if owns_meter:
            in_helper = _metrics_in_helper(span_exporter, None, None, None)
    return TracingSink(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        owns_tracer_provider=tracer_provider is not None,
        owns_meter_provider=owns_meter,
        span_processor=span_processor,
        batch_processor=batch,
        metrics_in_helper=in_helper,
    )

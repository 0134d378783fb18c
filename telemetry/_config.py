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
- :func:`configure` with no argument does what those variables alone do: spans *and* GenAI
  metrics by OTLP to ``OTEL_EXPORTER_OTLP_*`` (default ``http://localhost:4318``), unless
  ``OTEL_METRICS_EXPORTER=none``.
- The tracer and meter providers llmtrail builds together share one Resource: the same
  ``service.name`` and ``service.instance.id`` (``host:pid``, as the events' ``instance``,
  unless ``OTEL_RESOURCE_ATTRIBUTES`` sets one), so metrics join traces per instance.
- A sink shuts down only what it created for itself; providers made by :func:`configure` live
  until the next :func:`configure` or process exit. At exit they are shut down within
  ``DEFAULT_TIMEOUT_S`` (not the SDK's 30 s): a dead collector never holds the process.
- Exporters read their endpoint, headers, timeout and compression from the ``OTEL_*``
  variables themselves; ``OTEL_SERVICE_NAME`` names the service (default ``llmtrail``). The
  OTLP span exporter is wrapped in :class:`OutageAwareExporter` (one warning per outage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from llmtrail.pipeline import ConfigurationError, default_instance

from . import _attributes as A
from ._outage import OutageAwareExporter
from ._sink import DEFAULT_TIMEOUT_S, TracingSink, close_at_exit, shut_down_within

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
    timeout_s: float
    endpoint: str | None  # the OTLP collector llmtrail sends to, when it built the exporters


_configured: _Configured | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def service_resource(service_name: str | None, instance: str | None = None) -> Resource:
    """The resource of llmtrail's spans and metrics: ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` first, then ``service_name`` (default ``llmtrail``), and
    ``service.instance.id`` = ``instance`` unless ``OTEL_RESOURCE_ATTRIBUTES`` sets one.

    (``Resource.create`` gives every call a new random instance id: two providers built from
    it would never join.)"""
    resource = Resource.create({})
    extra: dict[str, str] = {}
    current = resource.attributes.get(A.SERVICE_NAME)
    if service_name:
        extra[A.SERVICE_NAME] = service_name
    elif not isinstance(current, str) or current.startswith("unknown_service"):
        extra[A.SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if instance and A.SERVICE_INSTANCE_ID not in OTELResourceDetector().detect().attributes:
        extra[A.SERVICE_INSTANCE_ID] = instance
    return resource.merge(Resource(extra)) if extra else resource


def _protocol(explicit: str | None, signal: str) -> str:
    """The OTLP protocol asked for (argument, then variables, then http/protobuf); a clear
    :class:`ConfigurationError` naming what asked for it when it is unknown or not installed."""
    asked_by = "protocol="
    protocol = explicit
    if protocol is None:
        for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            if os.environ.get(name):
                protocol, asked_by = os.environ[name], f"{name}="
                break
    protocol = (protocol or "http/protobuf").strip()
    if protocol not in _PROTOCOLS:
        raise ConfigurationError(
            f"OTLP protocol {asked_by}{protocol!r} is unsupported: use 'http/protobuf' "
            "(default) or 'grpc'"
        )
    if protocol == "grpc":
        try:  # imported now rather than found: an import blocked in sys.modules counts as absent
            import opentelemetry.exporter.otlp.proto.grpc  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                f"OTLP protocol {asked_by}'grpc' needs the gRPC exporter, which is not "
                f"installed: pip install opentelemetry-exporter-otlp-proto-grpc, or set "
                f"{asked_by}'http/protobuf'"
            ) from None
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
    from ._metric_export import OutageAwareMetricExporter, grpc_metric_exporter

    if protocol == "grpc":
        return grpc_metric_exporter(endpoint, _where(endpoint, "METRICS"))
    url = _signal_url(endpoint, "/v1/metrics", protocol) if endpoint else None
    return OutageAwareMetricExporter(endpoint=url, where=_where(endpoint, "METRICS"))


def _where(endpoint: str | None, signal: str) -> str:
    """Where a signal goes, for messages."""
    return (
        endpoint
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4318"
    )


def _watched_span_exporter(endpoint: str | None, protocol: str | None) -> SpanExporter:
    """The OTLP span exporter llmtrail builds, reporting collector outages once."""
    return OutageAwareExporter(
        otlp_span_exporter(endpoint, protocol), endpoint=_where(endpoint, "TRACES")
    )


def _new_tracer_provider(exporter: SpanExporter, resource: Resource) -> TracerProvider:
    """A provider batch-exporting to ``exporter``; closed within a bound at exit."""
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    close_at_exit(provider)
    return provider


def otlp_meter_provider(
    endpoint: str | None, protocol: str | None, resource: Resource
) -> SDKMeterProvider:
    """GenAI metrics by OTLP to ``endpoint`` (``None``: the ``OTEL_*`` variables)."""
    reader = PeriodicExportingMetricReader(_otlp_metric_exporter(endpoint, protocol))
    provider = SDKMeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
    close_at_exit(provider)
    return provider


def configure(
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    service_name: str | None = None,
    exporter: SpanExporter | None = None,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TracerProvider:
    """Send llmtrail's spans and GenAI metrics somewhere, for every service created after.

    - ``endpoint``: an OTLP base URL such as ``http://localhost:4318`` (``/v1/traces`` and
      ``/v1/metrics`` are appended for http/protobuf); ``None`` reads the ``OTEL_*`` variables
      (default ``http://localhost:4318``), for spans and metrics alike.
    - ``protocol``: ``"http/protobuf"`` (default) or ``"grpc"`` (needs
      opentelemetry-exporter-otlp-proto-grpc).
    - ``exporter``: any SpanExporter instead of OTLP (e.g. ``InMemorySpanExporter`` in tests).
    - ``tracer_provider``: use this SDK provider as it is (nothing is added to it).
    - ``meter_provider``: where the metrics go; by default a global SDK one when the
      application set one, else OTLP (``endpoint``, or the ``OTEL_*`` variables unless
      ``OTEL_METRICS_EXPORTER=none``); with an ``exporter`` or a ``tracer_provider`` of yours,
      OTLP only when an endpoint or the ``OTEL_*`` variables ask for it.
    - ``timeout_s``: the most a service's ``flush()``/``aclose()`` waits for the exporters
      (default 2 s), so a collector that is down never holds up the application.

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
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ConfigurationError(
            f"configure(timeout_s={timeout_s!r}) is invalid: use a number of seconds > 0"
        )
    owned: list[TracerProvider | SDKMeterProvider] = []
    resource = service_resource(service_name, default_instance())
    # With a test's or a non-OTLP exporter, or the user's own provider, metrics go to OTLP
    # only when asked for (an endpoint, or the OTEL_* variables).
    otlp_by_default = exporter is None and tracer_provider is None
    if tracer_provider is None:
        if exporter is None:
            exporter = _watched_span_exporter(endpoint, protocol)
        tracer_provider = _new_tracer_provider(exporter, resource)
        owned.append(tracer_provider)
    elif service_name is None:
        resource = tracer_provider.resource  # metrics join the user's spans
    if meter_provider is None and endpoint is None:
        meter_provider = _global_sdk_meter_provider()
    if meter_provider is None and (
        endpoint is not None or _env_wants_metrics(force=otlp_by_default)
    ):
        meter_provider = otlp_meter_provider(endpoint, protocol, resource)
        owned.append(meter_provider)
    where = _where(endpoint, "TRACES") if otlp_by_default or endpoint is not None else None
    previous, _configured = (
        _configured,
        _Configured(tracer_provider, meter_provider, tuple(owned), float(timeout_s), where),
    )
    if previous is not None:
        shut_down_within(previous.owned)
    return tracer_provider


def reset() -> None:
    """Forget :func:`configure` (and shut down what it created); for tests and reloads."""
    global _configured
    previous, _configured = _configured, None
    if previous is not None:
        shut_down_within(previous.owned)


def _global_sdk_tracer_provider() -> TracerProvider | None:
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def _global_sdk_meter_provider() -> SDKMeterProvider | None:
    provider = metrics.get_meter_provider()
    return provider if isinstance(provider, SDKMeterProvider) else None


def _env_exporters(name: str) -> list[str]:
    return [part.strip().lower() for part in os.environ.get(name, "").split(",") if part.strip()]


def _env_span_exporter(force: bool) -> SpanExporter | None:
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
        force
        or "otlp" in names
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return _watched_span_exporter(None, None)
    return None


def _env_wants_metrics(force: bool) -> bool:
    names = _env_exporters("OTEL_METRICS_EXPORTER")
    if "none" in names:
        return False
    return bool(
        force
        or "otlp" in names
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )


def tracing_sink_from_environment(*, force: bool = False, **_: object) -> TracingSink | None:
    """The tracing sink the service adds when the user passed none, or ``None`` (tracing off).

    ``force=True`` (the service's ``tracing=True``) turns tracing on even when nothing is
    configured: spans and metrics then go by OTLP to ``OTEL_EXPORTER_OTLP_*`` or the OTLP
    default ``http://localhost:4318``. ``OTEL_SDK_DISABLED=true`` still wins: it is the
    operator's switch. Other keyword arguments are accepted and ignored, so the service can
    pass more without breaking this entry point.
    """
    if _truthy("OTEL_SDK_DISABLED"):
        return None
    if _configured is not None:
        return TracingSink(
            tracer_provider=_configured.tracer_provider,
            meter_provider=_configured.meter_provider,
            timeout_s=_configured.timeout_s,
            endpoint=_configured.endpoint,
        )
    global_tracer = _global_sdk_tracer_provider()
    global_meter = _global_sdk_meter_provider()
    if global_tracer is not None:
        return TracingSink(tracer_provider=global_tracer, meter_provider=global_meter)

    span_exporter = _env_span_exporter(force)
    wants_metrics = global_meter is None and _env_wants_metrics(force)
    if span_exporter is None and global_meter is None and not wants_metrics:
        # Nothing asked for telemetry: the common case, decided without building anything.
        return None
    resource = service_resource(None, default_instance())
    tracer_provider = (
        _new_tracer_provider(span_exporter, resource) if span_exporter is not None else None
    )
    meter_provider: MeterProvider | None = global_meter
    if wants_metrics:
        meter_provider = otlp_meter_provider(None, None, resource)
    return TracingSink(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        owns_tracer_provider=tracer_provider is not None,
        owns_meter_provider=wants_metrics,
        endpoint=_where(None, "TRACES"),
    )

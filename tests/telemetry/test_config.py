"""Where telemetry goes (telemetry._config): configure() and the OTEL_* environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from llmtrail import telemetry
from llmtrail.pipeline import ConfigurationError
from llmtrail.telemetry import TracingSink, tracing_sink_from_environment
from llmtrail.telemetry._outage import OutageAwareExporter

from . import streams


@pytest.fixture
def global_sdk_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[TracerProvider]:
    """A user's SDK provider set globally; the OTel globals are restored afterwards."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    provider = TracerProvider(shutdown_on_exit=False)
    trace.set_tracer_provider(provider)
    yield provider
    provider.shutdown()


def test_nothing_configured_means_no_sink() -> None:
    assert tracing_sink_from_environment() is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces"),
        ("OTEL_TRACES_EXPORTER", "otlp"),
    ],
)
async def test_standard_otel_variables_turn_tracing_on(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    sink = tracing_sink_from_environment()
    assert isinstance(sink, TracingSink)
    assert isinstance(sink.tracer_provider, TracerProvider)
    assert sink.tracer_provider.resource.attributes["service.name"] == "llmtrail"
    await sink.aclose()


async def test_otel_service_name_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    sink = tracing_sink_from_environment()
    assert sink is not None and sink.tracer_provider is not None
    assert sink.tracer_provider.resource.attributes["service.name"] == "checkout"
    await sink.aclose()


def test_sdk_disabled_wins_over_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry.configure(exporter=InMemorySpanExporter())
    assert tracing_sink_from_environment() is None
    assert tracing_sink_from_environment(force=True) is None


async def test_traces_exporter_none_turns_traces_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing_sink_from_environment() is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert tracing_sink_from_environment(force=True) is None
    # tracing=True with only traces off still records the GenAI metrics.
    monkeypatch.delenv("OTEL_METRICS_EXPORTER")
    sink = tracing_sink_from_environment(force=True)
    assert sink is not None and sink.tracer_provider is None
    assert isinstance(sink.meter_provider, MeterProvider)
    await sink.aclose()


def test_unknown_traces_exporter_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigurationError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        tracing_sink_from_environment()


async def test_the_otlp_span_exporter_runs_in_process_and_reports_outages_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    sink = tracing_sink_from_environment()
    assert sink is not None and sink.tracer_provider is not None
    processors = sink.tracer_provider._active_span_processor._span_processors
    assert len(processors) == 1
    exporter = processors[0].span_exporter  # type: ignore[attr-defined]
    assert isinstance(exporter, OutageAwareExporter)
    assert isinstance(exporter.exporter, OTLPSpanExporter)
    await sink.aclose()


def test_unknown_protocol_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigurationError, match="http/json"):
        tracing_sink_from_environment()


async def test_force_turns_tracing_on_with_nothing_configured() -> None:
    sink = tracing_sink_from_environment(force=True, unknown_future_argument=1)
    assert isinstance(sink, TracingSink)
    await sink.aclose()


async def test_configure_with_an_exporter_sends_every_new_sinks_spans_there() -> None:
    exporter = InMemorySpanExporter()
    provider = telemetry.configure(exporter=exporter, service_name="svc")
    assert provider.resource.attributes["service.name"] == "svc"
    sinks = [tracing_sink_from_environment(), tracing_sink_from_environment()]
    for sink, b in zip(sinks, (streams.success(), streams.failure()), strict=True):
        assert sink is not None and sink.tracer_provider is provider
        for event in b.events:
            sink.emit(event)
        await sink.aclose()
    # A sink does not shut down configure()'s provider: both calls were exported.
    assert len({s.context.trace_id for s in exporter.get_finished_spans() if s.context}) == 2


async def test_configure_again_shuts_down_what_the_first_call_made() -> None:
    first_exporter = InMemorySpanExporter()
    first = telemetry.configure(exporter=first_exporter)
    second_exporter = InMemorySpanExporter()
    telemetry.configure(exporter=second_exporter)
    with first.get_tracer("x").start_as_current_span("after shutdown"):
        pass
    first.force_flush()
    assert first_exporter.get_finished_spans() == ()
    sink = tracing_sink_from_environment()
    assert sink is not None
    for event in streams.success().events:
        sink.emit(event)
    await sink.flush()
    assert len(second_exporter.get_finished_spans()) == 4


async def test_configure_uses_a_given_provider_as_it_is() -> None:
    exporter = InMemorySpanExporter()
    users = TracerProvider(shutdown_on_exit=False)
    users.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    assert telemetry.configure(tracer_provider=users, meter_provider=meters) is users
    sink = tracing_sink_from_environment()
    assert sink is not None and sink.meter_provider is meters
    for event in streams.success().events:
        sink.emit(event)
    await sink.aclose()
    telemetry.reset()  # must not shut down the user's providers
    assert len(exporter.get_finished_spans()) == 4
    assert reader.get_metrics_data() is not None
    users.shutdown()
    meters.shutdown()


def test_configure_rejects_a_provider_with_an_exporter() -> None:
    with pytest.raises(ConfigurationError, match="ambiguous"):
        telemetry.configure(tracer_provider=TracerProvider(), exporter=InMemorySpanExporter())


async def test_a_global_sdk_provider_is_kept_and_not_shut_down(
    global_sdk_provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    global_sdk_provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The user's provider wins over the environment too.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    sink = tracing_sink_from_environment()
    assert sink is not None and sink.tracer_provider is global_sdk_provider
    for event in streams.success().events:
        sink.emit(event)
    await sink.aclose()
    with global_sdk_provider.get_tracer("user").start_as_current_span("still on"):
        pass
    assert [s.name for s in exporter.get_finished_spans()][-1] == "still on"


def test_grpc_without_its_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # None in sys.modules makes its import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    with pytest.raises(ConfigurationError, match="opentelemetry-exporter-otlp-proto-grpc"):
        telemetry.configure(endpoint="http://127.0.0.1:4317", protocol="grpc")


async def test_metrics_only_when_traces_are_off_but_an_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    sink = tracing_sink_from_environment()
    assert sink is not None
    assert sink.tracer_provider is None and isinstance(sink.meter_provider, MeterProvider)
    sink._owns_meter_provider = False  # don't try to export to the closed port on shutdown
    await sink.aclose()
    sink.meter_provider.shutdown(timeout_millis=100)


def test_a_bad_timeout_names_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"timeout_s=0.*seconds > 0"):
        telemetry.configure(exporter=InMemorySpanExporter(), timeout_s=0)


async def test_spans_and_metrics_share_one_instance_unless_the_variables_name_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmtrail.pipeline import default_instance

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    sink = tracing_sink_from_environment()
    assert sink is not None and sink.tracer_provider is not None
    assert isinstance(sink.meter_provider, MeterProvider)
    # The SDK would give each provider a random instance id of its own.
    assert sink.tracer_provider.resource is sink.meter_provider._sdk_config.resource
    assert sink.resource_attributes == {
        "service.name": "llmtrail",
        "service.instance.id": default_instance(),
    }
    sink._owns_meter_provider = False  # nothing listens: do not wait for a final export
    await sink.aclose()
    sink.meter_provider.shutdown(timeout_millis=100)

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,service.version=2.1")
    provider = telemetry.configure(exporter=InMemorySpanExporter())
    assert provider.resource.attributes["service.instance.id"] == "pod-7"
    sink = tracing_sink_from_environment()
    assert sink is not None
    assert sink.resource_attributes["service.version"] == "2.1"


def test_grpc_asked_by_the_environment_names_the_variable_and_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigurationError) as raised:
        tracing_sink_from_environment()
    message = str(raised.value)
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'" in message
    assert "pip install opentelemetry-exporter-otlp-proto-grpc" in message
    assert "\n" not in message


async def test_grpc_collector_down_is_one_warning_for_spans_and_metrics(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging
    import socket

    import structlog

    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    from llmtrail.telemetry._outage import outages

    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    # The metric reader's own thread exports too (not only flush and close): every 100 ms.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    outages.forget()
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        telemetry.configure(endpoint=endpoint, timeout_s=0.5)
        for _ in range(2):  # two services, each flushing its calls to the dead collector
            sink = tracing_sink_from_environment()
            assert sink is not None
            assert isinstance(sink.meter_provider, MeterProvider)
            for event in streams.success().events:
                sink.emit(event)
            await sink.flush()
            await asyncio.sleep(1.0)  # periodic exports from the reader's thread meanwhile
            await sink.aclose()
        telemetry.reset()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert endpoint in warnings[0]["event"]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]

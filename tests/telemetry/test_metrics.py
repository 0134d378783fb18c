"""GenAI client metrics from events (telemetry._metrics)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from llmtrail.telemetry import TracingSink

from . import streams


@pytest.fixture
def meters() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield reader, provider
    provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, tuple[str, list[HistogramDataPoint]]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, tuple[str, list[HistogramDataPoint]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = [p for p in metric.data.data_points if isinstance(p, HistogramDataPoint)]
                out[metric.name] = (metric.unit or "", points)
    return out


def _feed(provider: MeterProvider, *builders: streams.StreamBuilder) -> None:
    sink = TracingSink(meter_provider=provider)
    for b in builders:
        for event in b.events:
            sink.emit(event)


def test_token_usage_is_recorded_per_token_type_with_the_convention_buckets(
    meters: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    reader, provider = meters
    _feed(provider, streams.success())
    unit, points = _points(reader)["gen_ai.client.token.usage"]
    assert unit == "{token}"
    by_type = {dict(p.attributes)["gen_ai.token.type"]: p for p in points}
    assert set(by_type) == {"input", "output"}
    assert by_type["input"].sum == 12 and by_type["input"].count == 1
    assert by_type["output"].sum == 9
    assert list(by_type["input"].explicit_bounds) == [
        1,
        4,
        16,
        64,
        256,
        1024,
        4096,
        16384,
        65536,
        262144,
        1048576,
        4194304,
        16777216,
        67108864,
    ]
    attrs = dict(by_type["input"].attributes)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == 8123
    assert "llmtrail.call_id" not in attrs, "metrics stay low-cardinality"


def test_operation_duration_covers_every_call_and_tags_failures(
    meters: tuple[InMemoryMetricReader, MeterProvider],
) -> None:
    reader, provider = meters
    ok, failed = streams.success(), streams.failure()
    _feed(provider, ok, failed, streams.validation_failure())
    unit, points = _points(reader)["gen_ai.client.operation.duration"]
    assert unit == "s"
    assert sum(p.count for p in points) == 3
    by_error = {dict(p.attributes).get("error.type"): p for p in points}
    assert set(by_error) == {None, "auth", "validation"}
    assert by_error[None].sum == pytest.approx(ok.events[-1].payload["total_s"])
    assert list(by_error[None].explicit_bounds) == [
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.28,
        2.56,
        5.12,
        10.24,
        20.48,
        40.96,
        81.92,
    ]
    # No response, no token measurement.
    _, tokens = _points(reader)["gen_ai.client.token.usage"]
    assert sum(p.count for p in tokens) == 2


def test_repeated_call_shapes_land_on_the_same_points_and_the_shape_cache_is_bounded(
    meters: tuple[InMemoryMetricReader, MeterProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtrail.telemetry import _metrics

    reader, provider = meters
    monkeypatch.setattr(_metrics, "_MAX_ATTRIBUTE_SETS", 2)
    sink = TracingSink(meter_provider=provider)
    calls = [streams.success() for _ in range(3)] + [streams.failure(), streams.success()]
    for b in calls:
        for event in b.events:
            sink.emit(event)
    assert sink._metrics is not None and len(sink._metrics._attrs) <= 2
    _, points = _points(reader)["gen_ai.client.operation.duration"]
    by_error = {dict(p.attributes).get("error.type"): p.count for p in points}
    assert by_error == {None: 4, "auth": 1}
    _, tokens = _points(reader)["gen_ai.client.token.usage"]
    by_type = {dict(p.attributes)["gen_ai.token.type"]: p.count for p in tokens}
    assert by_type == {"input": 4, "output": 4}

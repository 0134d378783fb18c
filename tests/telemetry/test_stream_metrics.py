"""GenAI semantic-convention conformance (v1.41.1) of the streaming metrics: real streamed calls
through BaseLLMService and the openai SDK to the local server on 127.0.0.1, on both APIs, the
metrics read from the SDK's own in-memory reader.

Time to first chunk and time per output chunk are histograms in seconds with the convention's
duration buckets, recorded for streamed calls only, with the convention's low-cardinality
attributes. The names come from the installed semantic-conventions package and are written out
here too, so a wrong constant upstream fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as G
from opentelemetry.semconv._incubating.attributes import openai_attributes as O
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as M
from opentelemetry.semconv.attributes import error_attributes, server_attributes

from llmtrail.pipeline import BaseLLMService, GenerationRequest, GenerationResult
from llmtrail.telemetry import TracingSink
from tests.conftest import RecordingSink

KEY = "sk-test-stream-metrics-0123456789"
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48]
DURATION_BUCKETS += [40.96, 81.92]
TIME_PER_OUTPUT_CHUNK = "gen_ai.client.operation.time_per_output_chunk"
TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
CHUNKS = 4
INTERVAL_S = 0.02  # the server pauses this long after each text delta


@pytest.fixture
def metrics() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield meters, reader
    meters.shutdown()


def _histogram(reader: InMemoryMetricReader, name: str) -> tuple[Any, list[HistogramDataPoint]]:
    data = reader.get_metrics_data()
    assert data is not None
    found = [
        (metric, [p for p in metric.data.data_points if isinstance(p, HistogramDataPoint)])
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        if sm.scope.name == "llmtrail"
        for metric in sm.metrics
        if metric.name == name
    ]
    assert len(found) == 1, f"{name}: {len(found)} instruments"
    return found[0]


async def _calls(
    server: Any, recorder: RecordingSink, meters: MeterProvider
) -> list[GenerationResult]:
    """Per API: two streamed calls read to their end, one abandoned after its first delta, one
    plain call."""
    results = []
    for api in ("openai", "openai-chat"):
        async with BaseLLMService(
            "gpt-4o-mini",
            base_url=f"{server.url}/v1",
            api_key=KEY,
            provider=api,
            store_url=None,
            tracing=False,
            sinks=[recorder, TracingSink(meter_provider=meters)],  # closed with the service
        ) as service:
            for prompt in ("Say hi", "Name a river"):
                request = GenerationRequest(user_prompt=prompt)
                async with service.execute_generation_stream(request) as stream:
                    async for item in stream:
                        if isinstance(item, GenerationResult):
                            results.append(item)
            async with service.execute_generation_stream(GenerationRequest(user_prompt="x")) as s:
                async for _ in s:
                    break
            await service.execute_generation_async(GenerationRequest(user_prompt="Say hi"))
    return results


def _payload(recorder: RecordingSink, call_id: str, kind: str) -> dict[str, Any]:
    (found,) = [e.payload for e in recorder.events if e.call_id == call_id and str(e.type) == kind]
    return found


async def test_time_per_output_chunk_follows_the_convention_for_streamed_calls_only(
    mock_server_factory: Any,
    metrics: tuple[MeterProvider, InMemoryMetricReader],
    recorder: RecordingSink,
) -> None:
    server = await mock_server_factory(stream_chunks=CHUNKS, stream_interval_s=INTERVAL_S)
    meters, reader = metrics
    streamed = await _calls(server, recorder, meters)
    assert len(streamed) == 4 and all(r.success for r in streamed)

    assert M.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK == TIME_PER_OUTPUT_CHUNK
    metric, points = _histogram(reader, TIME_PER_OUTPUT_CHUNK)
    assert metric.unit == "s"
    assert "each chunk received after the first one" in metric.description
    # One mean per fully read stream: the abandoned ones had one chunk, the plain calls none.
    assert sum(p.count for p in points) == len(streamed)
    expected = []
    for result in streamed:
        received = _payload(recorder, result.call_id, "received")
        first = _payload(recorder, result.call_id, "first_token")
        assert received["chunks"] == CHUNKS
        expected.append((received["latency_s"] - first["ttft_s"]) / (CHUNKS - 1))
    assert sum(p.sum for p in points) == pytest.approx(sum(expected))
    # The server pauses after every text delta: no chunk after the first comes sooner.
    assert min(p.min for p in points) >= INTERVAL_S
    # One point per API, each with its two streams.
    by_api = {dict(p.attributes or {})[O.OPENAI_API_TYPE]: p.count for p in points}
    assert by_api == {"responses": 2, "chat_completions": 2}
    for point in points:
        assert list(point.explicit_bounds) == DURATION_BUCKETS
        attrs = dict(point.attributes or {})
        assert attrs[G.GEN_AI_OPERATION_NAME] == "chat"
        assert attrs[G.GEN_AI_PROVIDER_NAME] == "openai"
        assert attrs[G.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
        assert isinstance(attrs[G.GEN_AI_RESPONSE_MODEL], str)
        assert attrs[server_attributes.SERVER_ADDRESS] == "127.0.0.1"
        assert attrs[server_attributes.SERVER_PORT] == int(server.url.rsplit(":", 1)[1])
        assert type(attrs[server_attributes.SERVER_PORT]) is int
        assert error_attributes.ERROR_TYPE not in attrs
        assert "llmtrail.call_id" not in attrs, "no high-cardinality attribute on a metric"

    # Its twin, time to first chunk: every stream that received a delta, the abandoned too.
    assert M.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK == TIME_TO_FIRST_CHUNK
    ttft, ttft_points = _histogram(reader, TIME_TO_FIRST_CHUNK)
    assert ttft.unit == "s"
    assert sum(p.count for p in ttft_points) == len(streamed) + 2
    for point in ttft_points:
        assert list(point.explicit_bounds) == DURATION_BUCKETS

"""GenAI semantic-convention conformance (v1.41.1) of what llmtrail emits, per attribute and per
metric: real calls through BaseLLMService and the openai SDK to the local server on 127.0.0.1,
spans and metrics read from the SDK's own in-memory exporter and reader.

Each test is one kind of call: plain, retried, failed, structured output, cached + reasoning.
Names come from the installed semantic-conventions package, as the code's do; the values, types,
units and buckets are the convention's, written out here so a wrong constant upstream fails.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as G
from opentelemetry.semconv._incubating.attributes import openai_attributes as O
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as M
from opentelemetry.semconv.attributes import error_attributes, http_attributes, server_attributes
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from llmtrail import telemetry
from llmtrail.pipeline import BaseLLMService, GenerationRequest, GenerationResult

KEY = "sk-test-conformance-0123456789"
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304]
TOKEN_BUCKETS += [16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48]
DURATION_BUCKETS += [40.96, 81.92]
SCHEMA_URL = "https://opentelemetry.io/schemas/1.41.1"


class Answer(BaseModel):
    city: str
    population: int


@dataclass
class Traced:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def call_span(self, result: GenerationResult) -> ReadableSpan:
        (span,) = [
            s
            for s in self.spans.get_finished_spans()
            if s.kind is SpanKind.CLIENT
            and s.instrumentation_scope is not None
            and s.instrumentation_scope.name == "llmtrail"
            and (s.attributes or {}).get("llmtrail.call_id") == result.call_id
        ]
        return span

    def http_spans(self, call: ReadableSpan) -> list[ReadableSpan]:
        """The HTTP spans under the call's attempt spans, in attempt order."""
        assert call.context is not None
        attempts = sorted(
            (
                s
                for s in self.spans.get_finished_spans()
                if s.parent is not None
                and s.parent.span_id == call.context.span_id
                and s.name.startswith("attempt ")
            ),
            key=lambda s: s.name,
        )
        out = []
        for attempt in attempts:
            assert attempt.context is not None
            (http,) = [
                s
                for s in self.spans.get_finished_spans()
                if s.parent is not None and s.parent.span_id == attempt.context.span_id
            ]
            out.append(http)
        return out

    def histograms(self) -> dict[str, tuple[Any, list[HistogramDataPoint]]]:
        """metric name -> (metric, its points), for llmtrail's scope."""
        data = self.metrics.get_metrics_data()
        assert data is not None
        out: dict[str, tuple[Any, list[HistogramDataPoint]]] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                if sm.scope.name != "llmtrail":
                    continue
                assert sm.scope.schema_url == SCHEMA_URL
                for metric in sm.metrics:
                    out[metric.name] = (metric, list(metric.data.data_points))
        return out


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    telemetry.configure(exporter=exporter, meter_provider=meters, service_name="conformance")
    yield Traced(exporter, reader)
    telemetry.reset()
    meters.shutdown()


async def _calls(
    server: Any, *requests: GenerationRequest, **kwargs: Any
) -> list[GenerationResult]:
    async with BaseLLMService(
        "gpt-4o-mini",
        base_url=f"{server.url}/v1",
        api_key=KEY,
        store_url=None,
        retry_backoff_base_s=0.01,
        **kwargs,
    ) as service:
        return [await service.execute_generation_async(r, "conformance") for r in requests]


def _assert_common_call_span(span: ReadableSpan, server: Any) -> dict[str, Any]:
    """The attributes every call span has, with the convention's types."""
    a = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert span.name == "chat gpt-4o-mini"
    assert a[G.GEN_AI_OPERATION_NAME] == "chat"
    assert a[G.GEN_AI_PROVIDER_NAME] == "openai"
    assert a[O.OPENAI_API_TYPE] == "responses"
    assert a[G.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert a[server_attributes.SERVER_ADDRESS] == "127.0.0.1"
    assert a[server_attributes.SERVER_PORT] == int(server.url.rsplit(":", 1)[1])
    assert type(a[server_attributes.SERVER_PORT]) is int
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.schema_url == SCHEMA_URL
    # Nothing about content unless asked for.
    for name in (G.GEN_AI_INPUT_MESSAGES, G.GEN_AI_OUTPUT_MESSAGES, G.GEN_AI_SYSTEM_INSTRUCTIONS):
        assert name not in a
    return a


def _assert_response_attributes(a: dict[str, Any], result: GenerationResult) -> None:
    assert a[G.GEN_AI_RESPONSE_ID] == result.response_id
    assert isinstance(a[G.GEN_AI_RESPONSE_MODEL], str) and a[G.GEN_AI_RESPONSE_MODEL]
    assert a[G.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert a[G.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.input_tokens
    assert a[G.GEN_AI_USAGE_OUTPUT_TOKENS] == result.usage.output_tokens
    for name in (G.GEN_AI_USAGE_INPUT_TOKENS, G.GEN_AI_USAGE_OUTPUT_TOKENS):
        assert type(a[name]) is int
    assert a[O.OPENAI_RESPONSE_SERVICE_TIER] == "default"


def _assert_metrics(traced: Traced, *, calls: int, answered: int, error: str | None) -> None:
    histograms = traced.histograms()
    names = {M.GEN_AI_CLIENT_OPERATION_DURATION}
    if answered:  # no token usage without an answer
        names.add(M.GEN_AI_CLIENT_TOKEN_USAGE)
    assert set(histograms) == names
    usage_points: list[HistogramDataPoint] = []
    if answered:
        usage, usage_points = histograms[M.GEN_AI_CLIENT_TOKEN_USAGE]
        assert usage.unit == "{token}"
    duration, duration_points = histograms[M.GEN_AI_CLIENT_OPERATION_DURATION]
    assert duration.unit == "s"
    assert sum(p.count for p in duration_points) == calls
    assert sum(p.count for p in usage_points) == 2 * answered
    for point in usage_points:
        assert list(point.explicit_bounds) == TOKEN_BUCKETS
        attrs = dict(point.attributes or {})
        assert attrs[G.GEN_AI_TOKEN_TYPE] in ("input", "output")
        assert attrs[O.OPENAI_RESPONSE_SERVICE_TIER] == "default"
        assert isinstance(attrs[G.GEN_AI_RESPONSE_MODEL], str)
    for point in duration_points:
        assert list(point.explicit_bounds) == DURATION_BUCKETS
        assert point.sum > 0
    for point in usage_points + duration_points:
        attrs = dict(point.attributes or {})
        assert attrs[G.GEN_AI_OPERATION_NAME] == "chat"
        assert attrs[G.GEN_AI_PROVIDER_NAME] == "openai"
        assert attrs[O.OPENAI_API_TYPE] == "responses"
        assert attrs[G.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
        assert attrs[server_attributes.SERVER_ADDRESS] == "127.0.0.1"
        assert type(attrs[server_attributes.SERVER_PORT]) is int
        assert "llmtrail.call_id" not in attrs, "no high-cardinality attribute on a metric"
    errors = {dict(p.attributes or {}).get(error_attributes.ERROR_TYPE) for p in duration_points}
    assert errors == {error}


async def test_a_plain_call(mock_server: Any, traced: Traced) -> None:
    (result,) = await _calls(
        mock_server, GenerationRequest(user_prompt="Say hi", max_output_tokens=64, temperature=0.2)
    )
    assert result.success, result.error_message
    span = traced.call_span(result)
    a = _assert_common_call_span(span, mock_server)
    _assert_response_attributes(a, result)
    assert a[G.GEN_AI_REQUEST_MAX_TOKENS] == 64 and type(a[G.GEN_AI_REQUEST_MAX_TOKENS]) is int
    assert a[G.GEN_AI_REQUEST_TEMPERATURE] == 0.2
    assert type(a[G.GEN_AI_REQUEST_TEMPERATURE]) is float
    for absent in (G.GEN_AI_OUTPUT_TYPE, G.GEN_AI_CONVERSATION_ID, error_attributes.ERROR_TYPE):
        assert absent not in a
    assert span.status.status_code is StatusCode.UNSET
    (http,) = traced.http_spans(span)
    assert http_attributes.HTTP_REQUEST_RESEND_COUNT not in (http.attributes or {})
    _assert_metrics(traced, calls=1, answered=1, error=None)


async def test_a_retried_call(mock_server_factory: Any, traced: Traced) -> None:
    server = await mock_server_factory(
        fault_script=("rate_limit_429",), fault_429_retry_after_s=0.01
    )
    (result,) = await _calls(server, GenerationRequest(user_prompt="Say hi"))
    assert result.success and result.attempts == 2, result.error_message
    span = traced.call_span(result)
    a = _assert_common_call_span(span, server)
    _assert_response_attributes(a, result)
    first, second = traced.http_spans(span)
    # The first send is no resend; the second is the first resend.
    assert http_attributes.HTTP_REQUEST_RESEND_COUNT not in (first.attributes or {})
    resend = (second.attributes or {})[http_attributes.HTTP_REQUEST_RESEND_COUNT]
    assert resend == 1 and type(resend) is int
    _assert_metrics(traced, calls=1, answered=1, error=None)


async def test_a_failed_call(mock_server_factory: Any, traced: Traced) -> None:
    server = await mock_server_factory(fault_script=("http_500",))
    (result,) = await _calls(server, GenerationRequest(user_prompt="Say hi"), max_attempts=1)
    assert not result.success
    span = traced.call_span(result)
    a = _assert_common_call_span(span, server)
    assert a[error_attributes.ERROR_TYPE] == "server_error"
    assert G.GEN_AI_USAGE_INPUT_TOKENS not in a and G.GEN_AI_RESPONSE_ID not in a
    assert span.status.status_code is StatusCode.ERROR
    attempt = next(
        s
        for s in traced.spans.get_finished_spans()
        if s.name == "attempt 1"
        and s.parent is not None
        and span.context is not None
        and s.parent.span_id == span.context.span_id
    )
    assert (attempt.attributes or {})[http_attributes.HTTP_RESPONSE_STATUS_CODE] == 500
    for described in (span, attempt):
        description = described.status.description or ""
        # The provider's own words; the code is on the span already, not in the text.
        assert description and "500" not in description and "Error code" not in description
    _assert_metrics(traced, calls=1, answered=0, error="server_error")


async def test_a_structured_output_call_continuing_a_conversation(
    mock_server: Any, traced: Traced
) -> None:
    (result,) = await _calls(
        mock_server,
        GenerationRequest(
            user_prompt="Biggest city?", response_schema=Answer, previous_response_id="resp_prev1"
        ),
    )
    assert result.success, result.error_message
    assert isinstance(result.content, Answer)
    a = _assert_common_call_span(traced.call_span(result), mock_server)
    _assert_response_attributes(a, result)
    assert a[G.GEN_AI_OUTPUT_TYPE] == "json"
    assert a[G.GEN_AI_CONVERSATION_ID] == "resp_prev1"
    _assert_metrics(traced, calls=1, answered=1, error=None)


async def test_a_call_with_cached_and_reasoning_tokens(mock_server: Any, traced: Traced) -> None:
    long_prompt = "Summarise the following text. " + "lorem ipsum dolor sit amet " * 300
    request = GenerationRequest(user_prompt=long_prompt, reasoning_effort="high")
    first, second = await _calls(mock_server, request, request)
    assert first.success and second.success, (first.error_message, second.error_message)
    assert second.usage.cached_tokens > 0 and second.usage.reasoning_tokens > 0
    a = _assert_common_call_span(traced.call_span(second), mock_server)
    _assert_response_attributes(a, second)
    cached = a[G.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS]
    reasoning = a[G.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS]
    assert cached == second.usage.cached_tokens and type(cached) is int
    assert reasoning == second.usage.reasoning_tokens and type(reasoning) is int
    _assert_metrics(traced, calls=2, answered=2, error=None)


# --- content capture ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "flag", "captured"),
    [
        (None, None, False),
        ("true", None, True),
        ("SPAN_ONLY", None, True),
        ("false", True, True),  # the constructor flag wins over the variable
        ("true", False, False),
    ],
)
async def test_content_capture_follows_the_standard_variable_and_the_flag(
    mock_server: Any,
    traced: Traced,
    monkeypatch: pytest.MonkeyPatch,
    env: str | None,
    flag: bool | None,
    captured: bool,
) -> None:
    if env is not None:
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", env)
    kwargs = {} if flag is None else {"capture_content": flag}
    (result,) = await _calls(
        mock_server,
        GenerationRequest(user_prompt="Say hi", system_prompt="Be brief."),
        **kwargs,
    )
    a = dict(traced.call_span(result).attributes or {})
    if not captured:
        assert not {G.GEN_AI_INPUT_MESSAGES, G.GEN_AI_SYSTEM_INSTRUCTIONS} & set(a)
        return
    # The system prompt is the instructions, apart from the chat history.
    assert json.loads(a[G.GEN_AI_SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(a[G.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Say hi"}]}
    ]
    (output,) = json.loads(a[G.GEN_AI_OUTPUT_MESSAGES])
    assert output["role"] == "assistant" and output["finish_reason"] == "stop"
    assert output["parts"] == [{"type": "text", "content": result.raw_content}]


def test_a_bad_capture_switch_names_the_accepted_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtrail.pipeline import ConfigurationError

    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "maybe")
    with pytest.raises(ConfigurationError, match="CAPTURE_MESSAGE_CONTENT='maybe'.*true or false"):
        BaseLLMService("gpt-4o-mini", api_key=KEY, store_url=None, tracing=False)

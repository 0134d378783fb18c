"""Micro-benchmark: what the tracing sink costs per call, in microseconds.

``python -m benchmarks.bench_tracing_sink [--quick]`` prints a table; ``main(quick)`` returns
the figures in the harness's ``Section`` format.

Variants, interleaved in every round, over the same synthetic event streams (shaped as the
service emits them: one attempt, no waits -> 2 spans; a 429 then success -> 4 spans):
- off: nothing configured, ``tracing_sink_from_environment()`` returns ``None``; the service
  then has no sink to call, so the per-call cost is the lookup, paid once per service;
- emit only: ``emit()`` of every event of a call (span building and the batch processor's
  enqueue), CPU time of the emitting thread; the exporter discards;
- + OTLP encoding: the same plus the protobuf encoding of every span (the exporter encodes,
  sends nothing), CPU time of the process until ``force_flush`` returns;
- + OTLP/HTTP export: spans sent to a local receiver in another process, until flushed;
- + metrics: emit only, with the GenAI histograms recorded too;
- the HTTP span: CPU per request of the SDK's httpx2 client, instrumented the way the sink
  does it (opentelemetry-instrumentation-httpx as shipped) against plain, over an in-memory
  transport, with the request headers the openai SDK sends (18) and OpenAI's usual 20 response
  headers (the instrumentation normalises all of them on every request; no network, so the
  figure is the instrumentation's own cost; the span is encoded until flushed).

Invariants: no network beyond 127.0.0.1; medians of interleaved rounds; CPU time, not wall
time; the receiver process's CPU is not counted. A calibration figure (``sum(range(1000))``)
says how fast the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llmtrail.pipeline import Event, EventType
from llmtrail.telemetry import TracingSink, tracing_sink_from_environment
from llmtrail.telemetry._config import otlp_span_exporter

from ._harness import otlp_receiver
from ._report import Figure, Section


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _EncodeOnly(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def _stream(retry: bool) -> list[Event]:
    """One call's events with fresh ids, as the service emits them."""
    call_id, trace_id, span_id = os.urandom(16).hex(), os.urandom(16).hex(), os.urandom(8).hex()
    now = datetime.now(UTC)
    out: list[Event] = []

    def emit(type_: EventType, payload: dict[str, Any]) -> None:
        nonlocal now
        now += timedelta(microseconds=150)
        out.append(Event(call_id, len(out), type_, now, trace_id, span_id, payload, "bench:1"))

    emit(
        EventType.TRACE_CREATED,
        {
            "operation_name": "bench", "model": "gpt-4o-mini", "request_id": None,
            "metadata": {"tenant": "acme"}, "estimated_input_tokens": 40,
            "max_output_tokens": 64, "reserved_tokens": 104, "rpm_at_start": 10,
            "tpm_at_start": 1000, "parent_span_id": None, "temperature": None,
            "reasoning_effort": None, "server_address": "127.0.0.1", "server_port": 8000,
            "capture_content": False,
        },
    )  # fmt: skip
    emit(EventType.GATE_WAIT, {"gate": "rpm", "attempt": 1, "amount": 1, "waited_s": 0.0,
                               "waiters_ahead": 0})  # fmt: skip
    emit(EventType.GATE_WAIT, {"gate": "tpm", "attempt": 1, "amount": 104, "waited_s": 0.0,
                               "waiters_ahead": 0})  # fmt: skip
    emit(EventType.SEMAPHORE_ACQUIRED, {"waited_s": 0.0, "in_flight": 3, "waiters_ahead": 0})
    attempts = 2 if retry else 1
    for n in range(1, attempts + 1):
        if n > 1:
            emit(EventType.GATE_WAIT, {"gate": "rpm", "attempt": n, "amount": 1,
                                       "waited_s": 0.002, "waiters_ahead": 1})  # fmt: skip
        emit(EventType.SENT, {"attempt": n})
        if n < attempts:
            emit(EventType.ATTEMPT_FAILED, {
                "attempt": n, "latency_s": 0.001, "error_type": "rate_limited", "status": 429,
                "retryable": True, "retry_after_s": 0.1, "message": "Rate limit reached",
                "provider_code": "rate_limit_exceeded", "provider_request_id": "req_1",
                "rate_limits": {},
            })  # fmt: skip
            emit(EventType.RETRY_SCHEDULED, {
                "attempt": n, "next_attempt": n + 1, "wait_s": 0.1, "reason": "rate_limited",
                "retry_after_s": 0.1,
            })  # fmt: skip
        else:
            emit(EventType.RECEIVED, {
                "attempt": n, "latency_s": 0.001, "status": 200, "response_id": "resp_1",
                "response_model": "gpt-4o-mini-2024-07-18", "finish_reasons": ["stop"],
                "input_tokens": 40, "cached_tokens": 0, "output_tokens": 50,
                "reasoning_tokens": 0, "total_tokens": 90, "cost_usd": "0.0000360",
                "provider_request_id": "req_2", "rate_limits": {},
            })  # fmt: skip
    emit(EventType.COMPLETED, {
        "outcome": "succeeded", "error_type": None, "error_message": None,
        "attempts": attempts, "input_tokens": 40, "cached_tokens": 0, "output_tokens": 50,
        "reasoning_tokens": 0, "total_tokens": 90, "cost_usd": "0.0000360",
        "model": "gpt-4o-mini-2024-07-18", "response_id": "resp_1", "rpm_wait_s": 0.0,
        "tpm_wait_s": 0.0, "semaphore_wait_s": 0.0, "latency_s": 0.001, "total_s": 0.002,
    })  # fmt: skip
    return out


def _sink(exporter: SpanExporter | None, metrics: bool = False) -> TracingSink:
    provider = None
    if exporter is not None:
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    meters = MeterProvider([InMemoryMetricReader()], shutdown_on_exit=False) if metrics else None
    return TracingSink(
        tracer_provider=provider,
        meter_provider=meters,
        owns_tracer_provider=True,
        owns_meter_provider=True,
    )


def _run(sink: TracingSink, calls: list[list[Event]], until_flushed: bool) -> float:
    """CPU microseconds per call: of the emitting thread, or of the whole process (the batch
    processor's thread included) until everything is flushed.

    CPU time rather than wall time: on a shared machine, wall time mostly measures the
    neighbours.
    """
    clock = time.process_time if until_flushed else time.thread_time
    started = clock()
    for events in calls:
        for event in events:
            sink.emit(event)
    if until_flushed and sink.tracer_provider is not None:
        sink.tracer_provider.force_flush()
    elapsed = clock() - started
    if sink.tracer_provider is not None:
        sink.tracer_provider.shutdown()
    if sink.meter_provider is not None and isinstance(sink.meter_provider, MeterProvider):
        sink.meter_provider.shutdown()
    return elapsed / len(calls) * 1e6


# What OpenAI answers with (values shortened): the instrumentation reads every header.
_RESPONSE_HEADERS = [
    ("date", "Thu, 04 Dec 2026 12:00:00 GMT"), ("content-type", "application/json"),
    ("content-length", "2"), ("connection", "keep-alive"), ("openai-organization", "org-x"),
    ("openai-processing-ms", "412"), ("openai-project", "proj_x"),
    ("openai-version", "2020-10-01"), ("x-envoy-upstream-service-time", "415"),
    ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "2000000"),
    ("x-ratelimit-remaining-requests", "9999"), ("x-ratelimit-remaining-tokens", "1999900"),
    ("x-ratelimit-reset-requests", "6ms"), ("x-ratelimit-reset-tokens", "3ms"),
    ("x-request-id", "req_0123456789"), ("strict-transport-security", "max-age=31536000"),
    ("cf-cache-status", "DYNAMIC"), ("server", "cloudflare"), ("cf-ray", "8f00-AMS"),
]  # fmt: skip


# What the openai SDK sends with each request (as the pipeline's provider sends it): the
# instrumentation reads every request header too (httpx2 adds host, accept-encoding,
# connection and content-length).
_REQUEST_HEADERS = {
    "authorization": "Bearer sk-x", "accept": "application/json",
    "content-type": "application/json", "user-agent": "AsyncOpenAI/Python 3.60.0",
    "x-stainless-lang": "python", "x-stainless-package-version": "3.60.0",
    "x-stainless-os": "Linux", "x-stainless-arch": "x64", "x-stainless-runtime": "CPython",
    "x-stainless-runtime-version": "3.11.7", "x-stainless-async": "async:asyncio",
    "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
    "x-client-request-id": "call:1",
}  # fmt: skip


def _http_requests(n: int, instrumented: bool) -> float:
    """CPU microseconds per request of an httpx2 client (the process, until flushed)."""
    import httpx2

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=_RESPONSE_HEADERS, content=b"{}")

    async def run() -> float:
        sink = _sink(_EncodeOnly()) if instrumented else None
        transport = httpx2.MockTransport(answer)
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            if sink is not None:
                sink.instrument_http_client(client)
            started = time.process_time()
            for _ in range(n):
                await client.post("/v1/responses", content=b"{}", headers=_REQUEST_HEADERS)
            if sink is not None and sink.tracer_provider is not None:
                sink.tracer_provider.force_flush()
            elapsed = time.process_time() - started
        if sink is not None and sink.tracer_provider is not None:
            sink.tracer_provider.shutdown()
        return elapsed / n * 1e6

    return asyncio.run(run())


def _off(n: int) -> float:
    started = time.thread_time()
    for _ in range(n):
        assert tracing_sink_from_environment() is None
    return (time.thread_time() - started) / n * 1e6


def _calibration(n: int = 2_000) -> float:
    """CPU microseconds of ``sum(range(1000))``: how fast this machine is (about 8-10 us on a
    current desktop core), to compare figures across machines."""
    started = time.thread_time()
    for _ in range(n):
        sum(range(1000))
    return (time.thread_time() - started) / n * 1e6


def main(quick: bool = False) -> dict[str, Any]:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):  # fmt: skip
        os.environ.pop(name, None)
    n = 2_000 if quick else 10_000
    rounds = 3 if quick else 7
    section = Section("tracing_sink", "Tracing sink cost per call")
    with otlp_receiver() as url:
        variants: dict[str, Callable[[list[list[Event]]], float]] = {
            "emit only (span build + enqueue)": lambda c: _run(_sink(_Discard()), c, False),
            "emit + OTLP protobuf encoding, until flushed": lambda c: _run(
                _sink(_EncodeOnly()), c, True
            ),
            "emit + OTLP/HTTP export to a local receiver, until flushed": lambda c: _run(
                _sink(otlp_span_exporter(url)), c, True
            ),
            "emit + GenAI metrics (no spans)": lambda c: _run(_sink(None, metrics=True), c, False),
        }
        for label, retry in (("1 attempt, 2 spans", False), ("429 then success, 4 spans", True)):
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, variant in variants.items():
                    samples[name].append(variant([_stream(retry) for _ in range(n)]))
            for name, values in samples.items():
                section.add(Figure(f"{name} [{label}]", "CPU us/call", values))
    plain: list[float] = []
    traced: list[float] = []
    for _ in range(rounds):
        plain.append(_http_requests(n // 4, instrumented=False))
        traced.append(_http_requests(n // 4, instrumented=True))
    section.add(Figure("HTTP request, plain httpx2 client", "CPU us/req", plain))
    section.add(
        Figure(
            "HTTP request, instrumented (its span encoded)",
            "CPU us/req",
            traced,
            baseline="HTTP request, plain httpx2 client",
            ratio_samples=[t / p for t, p in zip(traced, plain, strict=True) if p > 0],
            note=f"the HTTP span adds {statistics.median(traced) - statistics.median(plain):.0f}"
            " us per request",
        )
    )
    section.add(
        Figure("off (nothing configured): sink lookup, once per service", "CPU us", [_off(1000)])
    )
    section.add(Figure("calibration: sum(range(1000))", "CPU us", [_calibration()]))
    section.notes.append(
        f"{n} calls per variant and round, {rounds} interleaved rounds, medians; "
        "synthetic streams shaped as the service emits them."
    )
    return section.to_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    result = main(parser.parse_args().quick)
    for figure in result["figures"]:
        print(f"{statistics.median(figure['samples']):10.1f} {figure['unit']:8} {figure['name']}")

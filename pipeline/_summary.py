"""The demo's summary: outcomes, each distinct error once with its fix, rates and money.

Invariants:
- Every failed call is counted under its ``error_type``; each type is shown once, with the
  message most of its calls got and what to do about it.
- The achieved send rate is measured over the interval a sliding-window gate controls: from
  the first send to one window after the last. A gate of C requests per window W never lets
  more than C sends into any W-long span, so that rate never exceeds the limit; the busiest
  window's count is reported beside the window's capacity.
- A total that leaves out unpriced calls says so; no call is ever priced at $0.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ._output import Column, emit_rows, exact_number, print_notes
from ._types import GenerationResult

__all__ = ["FIXES", "error_summary", "latency_figures", "print_summary", "send_rate"]

FIXES: dict[str, str] = {
    "rate_limited": "the provider answered 429 on every attempt: lower --max-rpm / --max-tpm "
    "to the provider's limits (its x-ratelimit-limit-* headers say what they are)",
    "quota_exceeded": "the account has no credit left: check the provider's billing page",
    "timeout": "the provider did not answer in time: raise the timeout, or retry later",
    "connection": "the provider could not be reached: check OPENAI_BASE_URL and the network",
    "server_error": "the provider failed on every attempt: retry later, or raise max_attempts",
    "conflict": "the provider reported a conflict (409): retry the call",
    "bad_request": "the provider refused the request: the message says which field is wrong",
    "auth": "the API key was refused: check OPENAI_API_KEY",
    "invalid_response": "the answer did not match what was asked (JSON, usage or the schema)",
    "too_large": "one call needs more tokens than a TPM window holds: raise --max-tpm or "
    "lower max_output_tokens",
    "limiter_unavailable": "the shared rate limiter (Redis) is down: start Redis, fix or unset "
    "LLMTRAIL_RATE_LIMIT_URL, or use rate_limit_fallback='local'",
    "validation": "the GenerationRequest is invalid: the message names the field",
    "internal": "a bug in llmtrail: please report it with `llmtrail events --call CALL_ID`",
    "cancelled": "the call was cancelled by its caller",
}


def error_summary(results: Sequence[GenerationResult]) -> dict[str, dict[str, Any]]:
    """Failed calls by ``error_type``: how many, the commonest message, and the fix."""
    messages: dict[str, Counter[str]] = {}
    for result in results:
        if not result.success:
            kind = str(result.error_type)
            messages.setdefault(kind, Counter())[result.error_message or ""] += 1
    out = {}
    for kind, counter in sorted(messages.items(), key=lambda item: -item[1].total()):
        message, _ = counter.most_common(1)[0]
        out[kind] = {
            "calls": counter.total(),
            "message": message,
            "other_messages": len(counter) - 1,
            "fix": FIXES.get(kind, ""),
        }
    return out


def send_rate(sent_at: Sequence[float], window_s: float) -> dict[str, Any]:
    """Requests sent per minute over [first send, last send + one window], and the most
    sends that fell into any one window."""
    times = sorted(sent_at)
    if not times:
        return {"send_rate_rpm": 0.0, "send_rate_interval_s": 0.0, "peak_sends_per_window": 0}
    interval = times[-1] - times[0] + window_s
    peak, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window_s:
            start += 1
        peak = max(peak, end - start + 1)
    return {
        "send_rate_rpm": round(len(times) / interval * 60, 1),
        "send_rate_interval_s": round(interval, 3),
        "peak_sends_per_window": peak,
    }


def _percentile(values: Sequence[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def latency_figures(results: Sequence[GenerationResult]) -> dict[str, float]:
    """Per-call latency (p50, p95) and the mean wait at each gate and the semaphore."""
    if not results:
        return {}
    totals = [r.timings.total_s for r in results]

    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 4)

    return {
        "latency_p50_s": round(_percentile(totals, 50), 4),
        "latency_p95_s": round(_percentile(totals, 95), 4),
        "rpm_wait_mean_s": mean([r.timings.rpm_wait_s for r in results]),
        "tpm_wait_mean_s": mean([r.timings.tpm_wait_s for r in results]),
        "semaphore_wait_mean_s": mean([r.timings.semaphore_wait_s for r in results]),
    }


def ttft_figures(ttft: Sequence[float]) -> dict[str, float]:
    """Time to first token of streamed calls, from the call's start (p50, p95)."""
    return {
        "ttft_p50_s": round(_percentile(ttft, 50), 4),
        "ttft_p95_s": round(_percentile(ttft, 95), 4),
    }


def _cost_text(summary: dict[str, Any]) -> str:
    cost, unpriced = summary["cost_usd"], summary["unpriced_calls"]
    if cost is None:
        return f"unpriced ({unpriced} calls)"
    text = exact_number(cost) if isinstance(cost, Decimal) else str(cost)
    return f"{text} + {unpriced} unpriced calls" if unpriced else text


def print_summary(summary: dict[str, Any], fmt: str) -> None:
    """The summary for people: a figure/value table, then each error type once."""
    rows: list[tuple[str, Any]] = [
        ("calls", summary["calls"]),
        ("succeeded", summary["succeeded"]),
        ("failed", summary["failed"]),
        ("HTTP attempts (retries)", f"{summary['http_attempts']} ({summary['retries']})"),
        (
            "429s seen / sent by the server",
            f"{summary['rate_limited_seen']} / {summary['server_429s']}",
        ),
        ("elapsed, s", summary["elapsed_s"]),
        ("send rate, req/min (see below)", summary["send_rate_rpm"]),
        ("RPM limit", summary["rpm_limit"]),
        (
            f"busiest {summary['window_s']:g} s window, sends (gate allows "
            f"{summary['window_capacity']})",
            summary["peak_sends_per_window"],
        ),
        ("input / output tokens", f"{summary['input_tokens']} / {summary['output_tokens']}"),
        ("cost, USD", _cost_text(summary)),
    ]
    if "latency_p50_s" in summary:
        rows += [
            ("latency p50 / p95, s", f"{summary['latency_p50_s']} / {summary['latency_p95_s']}"),
            ("mean wait: RPM gate, s", summary["rpm_wait_mean_s"]),
            ("mean wait: TPM gate, s", summary["tpm_wait_mean_s"]),
            ("mean wait: semaphore, s", summary["semaphore_wait_mean_s"]),
        ]
    if "ttft_p50_s" in summary:
        rows.append(
            (
                "time to first token p50 / p95, s",
                f"{summary['ttft_p50_s']} / {summary['ttft_p95_s']}",
            )
        )
    columns = [Column("figure", wrap=True), Column("value", numeric=True)]
    emit_rows(columns, [[label, str(value)] for label, value in rows], fmt, title="llmtrail demo")
    out = sys.stdout
    width = shutil.get_terminal_size().columns if fmt == "table" else 0

    def paragraph(text: str) -> str:
        if not width:
            return f"  {text}\n"
        return textwrap.fill(text, width, initial_indent="  ", subsequent_indent="    ") + "\n"

    for kind, error in summary["errors"].items():
        others = error["other_messages"]
        more = f" (and {others} other messages)" if others else ""
        out.write(f"\n{error['calls']} calls failed: {kind}{more}\n")
        if error["message"]:
            out.write(paragraph(error["message"]))
        if error["fix"]:
            out.write(paragraph(f"fix: {error['fix']}"))
    notes = []
    if summary["http_attempts"]:
        notes.append(
            f"send rate: {summary['http_attempts']} HTTP attempts over "
            f"{summary['send_rate_interval_s']} s, from the first send to one window after "
            "the last (the span a sliding-window gate controls), so it compares with the limit"
        )
    if summary["unpriced_calls"]:
        notes.append(
            f"{summary['unpriced_calls']} calls are unpriced (a model without a known price): "
            "they are counted, not priced at $0; LLMTRAIL_PRICES_FILE adds prices"
        )
    if summary.get("store"):
        notes.append(
            f"Events are in {summary['store']}. Try: llmtrail usage --by operation, "
            "llmtrail events --type attempt_failed, llmtrail projections status"
        )
    out.flush()
    print_notes(notes, fmt)

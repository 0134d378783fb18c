"""Every span, span-event, metric and attribute name llmtrail emits, in one place.

Invariants:
- GenAI and general semantic-convention names are imported from ``opentelemetry.semconv``,
  never retyped, so a rename upstream is one import away.
- Our own names all carry the ``llmtrail.`` prefix and are defined only here; the other
  modules of this package refer to these constants, never to string literals.
- Values of enumerated GenAI attributes are plain strings: the semconv enum classes are
  marked deprecated (they moved to a separate repository) and would warn on use.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_CONVERSATION_ID,
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_OUTPUT_TYPE,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    GEN_AI_SYSTEM_INSTRUCTIONS,
    GEN_AI_TOKEN_TYPE,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
)
from opentelemetry.semconv._incubating.attributes.openai_attributes import (
    OPENAI_API_TYPE,
    OPENAI_RESPONSE_SERVICE_TIER,
)
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_CLIENT_OPERATION_DURATION,
    GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
    GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
    GEN_AI_CLIENT_TOKEN_USAGE,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_RESEND_COUNT,
    HTTP_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.service_attributes import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
)
from opentelemetry.semconv.schemas import Schemas

__all__ = [
    "ERROR_TYPE",
    "EVENT_FIRST_TOKEN",
    "EVENT_RETRY_SCHEDULED",
    "EVENT_UNMARKED",
    "GEN_AI_CLIENT_OPERATION_DURATION",
    "GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK",
    "GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK",
    "GEN_AI_CLIENT_TOKEN_USAGE",
    "GEN_AI_CONVERSATION_ID",
    "GEN_AI_INPUT_MESSAGES",
    "GEN_AI_OPERATION_NAME",
    "GEN_AI_OUTPUT_MESSAGES",
    "GEN_AI_OUTPUT_TYPE",
    "GEN_AI_PROVIDER_NAME",
    "GEN_AI_REQUEST_MAX_TOKENS",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_REQUEST_STREAM",
    "GEN_AI_REQUEST_TEMPERATURE",
    "GEN_AI_RESPONSE_FINISH_REASONS",
    "GEN_AI_RESPONSE_ID",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_SYSTEM_INSTRUCTIONS",
    "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK",
    "GEN_AI_TOKEN_TYPE",
    "GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS",
    "GEN_AI_USAGE_INPUT_TOKENS",
    "GEN_AI_USAGE_OUTPUT_TOKENS",
    "GEN_AI_USAGE_REASONING_OUTPUT_TOKENS",
    "HTTP_REQUEST_RESEND_COUNT",
    "HTTP_RESPONSE_STATUS_CODE",
    "INSTRUMENTATION_SCOPE",
    "LLMTRAIL_AMOUNT",
    "LLMTRAIL_ATTEMPT",
    "LLMTRAIL_ATTEMPTS",
    "LLMTRAIL_CALL_ID",
    "LLMTRAIL_COST_USD",
    "LLMTRAIL_GATE",
    "LLMTRAIL_IN_FLIGHT",
    "LLMTRAIL_METADATA_PREFIX",
    "LLMTRAIL_NEXT_ATTEMPT",
    "LLMTRAIL_OPERATION_NAME",
    "LLMTRAIL_OUTCOME",
    "LLMTRAIL_PROVIDER_CODE",
    "LLMTRAIL_PROVIDER_REQUEST_ID",
    "LLMTRAIL_REASON",
    "LLMTRAIL_REASONING_EFFORT",
    "LLMTRAIL_REQUEST_ID",
    "LLMTRAIL_RETRYABLE",
    "LLMTRAIL_RETRY_AFTER_S",
    "LLMTRAIL_RPM_WAIT_S",
    "LLMTRAIL_SEMAPHORE_WAIT_S",
    "LLMTRAIL_TPM_WAIT_S",
    "LLMTRAIL_TTFT_S",
    "LLMTRAIL_WAITERS_AHEAD",
    "LLMTRAIL_WAIT_S",
    "OPENAI_API_TYPE",
    "OPENAI_RESPONSE_SERVICE_TIER",
    "OPERATION_CHAT",
    "OUTPUT_TYPE_JSON",
    "API_TYPE_CHAT_COMPLETIONS",
    "API_TYPE_RESPONSES",
    "api_type",
    "PROVIDER_OPENAI",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SCHEMA_URL",
    "SERVICE_INSTANCE_ID",
    "SERVICE_NAME",
    "SERVICE_VERSION",
    "SPAN_ATTEMPT",
    "SPAN_RPM_GATE",
    "SPAN_SEMAPHORE",
    "SPAN_TPM_GATE",
    "TOKEN_TYPE_INPUT",
    "TOKEN_TYPE_OUTPUT",
    "TOKEN_USAGE_BUCKETS",
    "OPERATION_DURATION_BUCKETS",
]

# The tracer's and meter's instrumentation scope, and the semantic conventions it follows
# (the GenAI conventions' last release in the main repository).
INSTRUMENTATION_SCOPE: Final = "llmtrail"
SCHEMA_URL: Final = Schemas.V1_41_1.value

# --- GenAI attribute values ------------------------------------------------------------------
# The Responses API is a chat-style generation; the semconv has no separate value for it.
OPERATION_CHAT: Final = "chat"
PROVIDER_OPENAI: Final = "openai"
API_TYPE_RESPONSES: Final = "responses"
API_TYPE_CHAT_COMPLETIONS: Final = "chat_completions"
OUTPUT_TYPE_JSON: Final = "json"
TOKEN_TYPE_INPUT: Final = "input"
TOKEN_TYPE_OUTPUT: Final = "output"

# --- Span and span-event names ---------------------------------------------------------------
# The call span is named "{gen_ai.operation.name} {gen_ai.request.model}" (semconv rule).
SPAN_RPM_GATE: Final = "rpm gate"
SPAN_TPM_GATE: Final = "tpm gate"
SPAN_SEMAPHORE: Final = "semaphore"
SPAN_ATTEMPT: Final = "attempt {n}"
EVENT_RETRY_SCHEDULED: Final = "retry_scheduled"
EVENT_UNMARKED: Final = "unmarked"
# On a streamed call's attempt span, when its first text delta arrived.
EVENT_FIRST_TOKEN: Final = "first_token"

# --- llmtrail's own attributes ---------------------------------------------------------------
# On the call span. Deliberately few: every attribute costs on every call (the SDK validates
# each one), and what a trace viewer does not need (estimates, rates at start) is in the store.
LLMTRAIL_CALL_ID: Final = "llmtrail.call_id"
LLMTRAIL_OPERATION_NAME: Final = "llmtrail.operation_name"
LLMTRAIL_REQUEST_ID: Final = "llmtrail.request_id"
LLMTRAIL_ATTEMPTS: Final = "llmtrail.attempts"
LLMTRAIL_COST_USD: Final = "llmtrail.cost_usd"
LLMTRAIL_RPM_WAIT_S: Final = "llmtrail.rpm_wait_s"
LLMTRAIL_TPM_WAIT_S: Final = "llmtrail.tpm_wait_s"
LLMTRAIL_SEMAPHORE_WAIT_S: Final = "llmtrail.semaphore_wait_s"
LLMTRAIL_OUTCOME: Final = "llmtrail.outcome"
LLMTRAIL_REASONING_EFFORT: Final = "llmtrail.reasoning_effort"
# Request metadata becomes one attribute per key: llmtrail.metadata.<key>.
LLMTRAIL_METADATA_PREFIX: Final = "llmtrail.metadata."
# On gate and semaphore spans.
LLMTRAIL_GATE: Final = "llmtrail.gate"
LLMTRAIL_AMOUNT: Final = "llmtrail.amount"
LLMTRAIL_WAITERS_AHEAD: Final = "llmtrail.waiters_ahead"
LLMTRAIL_IN_FLIGHT: Final = "llmtrail.in_flight"
# On attempt spans (LLMTRAIL_OUTCOME too) and their span events.
LLMTRAIL_ATTEMPT: Final = "llmtrail.attempt"
LLMTRAIL_RETRYABLE: Final = "llmtrail.retryable"
LLMTRAIL_RETRY_AFTER_S: Final = "llmtrail.retry_after_s"
LLMTRAIL_PROVIDER_CODE: Final = "llmtrail.provider_code"
LLMTRAIL_PROVIDER_REQUEST_ID: Final = "llmtrail.provider_request_id"
LLMTRAIL_NEXT_ATTEMPT: Final = "llmtrail.next_attempt"
LLMTRAIL_WAIT_S: Final = "llmtrail.wait_s"
LLMTRAIL_REASON: Final = "llmtrail.reason"
# On the first_token span event: seconds from the attempt's send to its first text delta.
LLMTRAIL_TTFT_S: Final = "llmtrail.ttft_s"

# --- Metric bucket boundaries (GenAI semantic conventions, explicit_bucket_boundaries) --------
TOKEN_USAGE_BUCKETS: Final[tuple[float, ...]] = (
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
)
OPERATION_DURATION_BUCKETS: Final[tuple[float, ...]] = (
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
)


def api_type(api: object) -> str:
    """``openai.api.type`` of a call whose ``trace_created`` says ``api`` ("chat" or
    "responses"; absent on calls recorded before the Chat Completions provider)."""
    return API_TYPE_CHAT_COMPLETIONS if api == "chat" else API_TYPE_RESPONSES

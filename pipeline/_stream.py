"""Streamed calls: ``execute_generation_stream`` and its sync twin.

A streamed call is a plain call whose last attempt hands its text over as it arrives. It takes
the same steps, through the same :class:`~pipeline._flow.CallFlow` methods: ``trace_created``,
both gates, the semaphore, attempts with retries, ``received``, ``completed``. What differs:

- The attempt opens the stream (:meth:`Provider.open_stream`) and returns once its headers
  arrived; only up to there can it be retried. After the first byte a failure ends the call
  (``stream_broken``, or ``invalid_response`` for a malformed event): part of the answer may
  already be with the caller.
- The semaphore permit is held from the attempt until the stream ends, however it ends.
- ``first_token`` is emitted at the first text delta (``ttft_s`` from the attempt's send,
  ``call_ttft_s`` from the call's start).
- ``received`` is emitted when the stream ends, whatever the end: it carries the usage the
  stream reported, or, when none came (the stream broke, was abandoned, or the server never
  sends usage), the estimate of :meth:`ProviderStream.snapshot`: the request's input
  estimate, and ``ceil(characters received / 4)`` output tokens. ``usage_estimated`` says
  which, ``partial`` whether the answer was cut short. The TPM reservation is reconciled to
  those tokens exactly as for a plain call (input + ``max_output_tokens`` when given).

Invariants:
- ``completed`` is always the last event: ``succeeded`` after a complete stream, ``failed``
  after a broken one, ``cancelled`` when the consumer abandons it (``break`` and then close or
  garbage collection, ``aclose()``, cancellation of the consuming task, a closed connection
  of the application's own client), with the tokens seen so far.
- Everything a call holds (gate reservations, the permit, the HTTP connection) is released
  before its final :class:`GenerationResult` is yielded, and on every abandonment.
- The iterator yields ``str`` deltas, then exactly one ``GenerationResult``, then stops.
- Use it as ``async with service.execute_generation_stream(r) as stream: async for ...``
  (or iterate it to its end): an abandoned stream that is still referenced holds its permit
  until it is closed or collected. ``service.aclose()`` closes the ones still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import structlog
from opentelemetry import trace as otel_trace

from llmtrail._log import get_logger

from ._call import CallState, CallStream, estimate_input_tokens, plain_traceback
from ._errors import ErrorType
from ._events import EventType, Outcome, StreamedFields
from ._flow import CallFlow
from ._portal import call_on_loop
from ._provider_types import ProviderError
from ._types import GenerationRequest, GenerationResult, coerce_request
from .typing import ProviderStream

if TYPE_CHECKING:
    from ._service import BaseLLMService

__all__ = ["GenerationStream", "iterate_sync", "open_generation_stream"]

_log = get_logger(__name__)
_END: Any = object()
StreamItem = str | GenerationResult


class _Open:
    """What one streamed call holds once its stream is open."""

    __slots__ = ("stream", "attempt", "chunks")

    def __init__(self, stream: ProviderStream, attempt: int) -> None:
        self.stream = stream
        self.attempt = attempt
        self.chunks = 0  # text deltas received


def _release(flow: CallFlow, state: CallState) -> None:
    if state.holding:
        state.holding = False
        flow._semaphore.release()


def _finish(
    flow: CallFlow,
    call: CallStream,
    state: CallState,
    request: GenerationRequest,
    op: str,
    model: str,
    opened: _Open,
    t0: float,
    error: ProviderError | None,
    outcome: Outcome,
) -> GenerationResult:
    """The end of an opened stream: ``received`` with what came, reconciliation, the permit
    back, ``completed``."""
    stream = opened.stream
    response, estimated = stream.snapshot(estimate_input_tokens(request))
    state.latency = flow._clock.now() - state.sent_at
    partial = not stream.complete or error is not None
    extra: StreamedFields = {
        "streamed": True,
        "partial": partial,
        "usage_estimated": estimated,
        "chunks": opened.chunks,
    }
    flow._received(call, model, opened.attempt, state.latency, response, state, extra)
    tpm = flow._tpm
    if state.tpm_res is not None and tpm is not None:
        counted = response.input_tokens + (request.max_output_tokens or response.output_tokens)
        tpm.reconcile(state.tpm_res, counted)
    _release(flow, state)
    if outcome is Outcome.SUCCEEDED:
        return flow._complete(call, state, request, op, model, response, None, None, t0, outcome)
    if error is not None:
        error_type, message = error.error_type, error.message
    else:
        error_type, message = ErrorType.CANCELLED, "the stream was abandoned by its consumer"
    return flow._complete(
        call, state, request, op, model, response, error_type, message, t0, outcome
    )


async def _call_stream(
    service: BaseLLMService,
    request: Any,
    operation_name: str | None,
    parent: otel_trace.SpanContext,
) -> AsyncIterator[StreamItem]:
    """One streamed call, on the service's loop: deltas, then its result."""
    flow: CallFlow = service._flow
    call, refused = await service._open_call(parent, request)
    clock = flow._clock
    t0 = clock.now()
    state = CallState()
    state.stream = True
    opened: _Open | None = None
    finished = False
    try:
        if refused is not None:  # the event store cannot take events: nothing is sent
            finished = True
            yield flow.refuse(call, request, operation_name, refused)
            return
        try:
            request = coerce_request(request)
        except (TypeError, ValueError) as exc:
            op = operation_name or "generation"
            finished = True
            failed = flow._fail_early(
                call, op, flow.model, None, ErrorType.VALIDATION, str(exc), t0
            )
            await call.settle()
            yield failed
            return
        op = operation_name or request.operation_name or "generation"
        model = request.model or flow.model
        try:
            with _bound(call):  # within one step of the generator: one context throughout
                # The stream once open (holding its permit), or a failure like a plain call's.
                opening = await flow._answer(call, state, request, op, model, parent, t0)
            if isinstance(opening, GenerationResult):
                finished = True
                await call.settle()  # write-ahead: `completed` is committed before the result
                yield opening
                return
            opened = _Open(opening, state.attempts)
            first = True
            error: ProviderError | None = None
            try:
                async for delta in opened.stream:
                    opened.chunks += 1
                    if first:
                        first = False
                        now = clock.now()
                        call.emit(
                            EventType.FIRST_TOKEN,
                            {
                                "attempt": opened.attempt,
                                "ttft_s": now - state.sent_at,
                                "call_ttft_s": now - t0,
                            },
                        )
                    yield delta
            except ProviderError as exc:
                error = exc
            outcome = Outcome.SUCCEEDED if error is None else Outcome.FAILED
            with _bound(call):
                result = _finish(flow, call, state, request, op, model, opened, t0, error, outcome)
            finished = True  # before the await below: a cancellation there changes nothing
            await opened.stream.aclose()
            await call.settle()  # write-ahead: `completed` is committed before the result
            yield result
        except asyncio.CancelledError:
            if not finished:
                finished = True
                with _bound(call):
                    _abandon(flow, call, state, request, op, model, opened, t0)
                await call.settle()  # the `completed` (cancelled) is committed before it goes on
            raise
        except GeneratorExit:  # closed by its consumer: no await is allowed here
            if not finished:
                finished = True
                with _bound(call):
                    _abandon(flow, call, state, request, op, model, opened, t0)
            raise
        except Exception as exc:  # a bug of ours: report it as a result, never leak slots
            if finished:
                raise
            finished = True
            _log.error(
                "llmtrail internal error", error=repr(exc)[:500], traceback=plain_traceback()
            )
            message = f"internal error in llmtrail: {exc!r}"
            _release(flow, state)
            failed = flow._fail(call, state, request, op, model, ErrorType.INTERNAL, message, t0)
            await call.settle()
            yield failed
    finally:
        _release(flow, state)
        if opened is not None:
            await opened.stream.aclose()
        service._close_call()


@contextlib.contextmanager
def _bound(call: CallStream) -> Iterator[None]:
    """The call's ids on every log line, as for a plain call. Only around code that does not
    yield: between two steps the generator may run in another task's context."""
    tokens = structlog.contextvars.bind_contextvars(
        call_id=call.call_id, trace_id=call.trace_id, span_id=call.span_id
    )
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def _abandon(
    flow: CallFlow,
    call: CallStream,
    state: CallState,
    request: GenerationRequest,
    op: str,
    model: str,
    opened: _Open | None,
    t0: float,
) -> None:
    """The consumer went away: complete the call as cancelled, with what it was billed."""
    if opened is not None:
        _finish(flow, call, state, request, op, model, opened, t0, None, Outcome.CANCELLED)
        return
    flow._cancelled(call, state, request, op, model, t0)


async def _next(iterator: AsyncIterator[StreamItem]) -> StreamItem:
    try:
        item: StreamItem = await iterator.__anext__()
    except StopAsyncIteration:
        return _END  # type: ignore[no-any-return]  # a StopAsyncIteration cannot cross a Future
    return item


async def _close(iterator: Any) -> None:
    await iterator.aclose()


class GenerationStream:
    """What ``execute_generation_stream`` returns: an async iterator of the answer's text
    deltas (``str``) and then its :class:`GenerationResult`, and an async context manager that
    closes it (an unfinished stream then ends ``completed(cancelled)``).

    ``result`` is the final result once it was yielded.
    """

    def __init__(
        self, iterator: AsyncIterator[StreamItem], own_loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self._iterator = iterator
        self._own_loop = own_loop  # the service's loop, when the caller runs on another one
        self.result: GenerationResult | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        if self._own_loop is None:
            item = await _next(self._iterator)
        else:
            item = await call_on_loop(self._own_loop, _next(self._iterator))
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, GenerationResult):
            self.result = item
        return item

    async def aclose(self) -> None:
        if self._own_loop is None:
            await _close(self._iterator)
        else:
            await call_on_loop(self._own_loop, _close(self._iterator))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# The streams of each service that are open, so that aclose() can end them.
_open: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def open_generation_stream(
    service: BaseLLMService, request: Any, operation_name: str | None
) -> GenerationStream:
    parent = otel_trace.get_current_span().get_span_context()
    iterator = _call_stream(service, request, operation_name, parent)
    _open.setdefault(service, weakref.WeakSet()).add(iterator)
    return GenerationStream(iterator, service._elsewhere())


async def close_open_streams(service: BaseLLMService) -> None:
    """End every stream of ``service`` that is open and not being iterated right now."""
    for iterator in list(_open.get(service, ())):
        if not iterator.ag_running:
            await iterator.aclose()


def iterate_sync(
    service: BaseLLMService, request: Any, operation_name: str | None
) -> Iterator[StreamItem]:
    """The sync twin: the same stream, driven on the service's loop from any thread."""
    parent = otel_trace.get_current_span().get_span_context()
    iterator = _call_stream(service, request, operation_name, parent)
    _open.setdefault(service, weakref.WeakSet()).add(iterator)
    try:
        while True:
            item = service._run_sync(_next(iterator))
            if item is _END:
                return
            yield item
    finally:
        # Closing a finished generator is a no-op; an abandoned one ends `cancelled`.
        service._run_sync(_close(iterator))

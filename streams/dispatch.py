"""Running one delivery: decode, run the handler under its timeout and span, classify.

`execute` is the one exception boundary per job: every `Exception` becomes an outcome and
only cancellation escapes. It knows nothing of any queue in particular.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace

from jobstream.otel import extract, presample, trace_id_of
from jobstream.otel.redact import exception_attributes, scrub
from jobstream.schema.envelope import (
    Envelope,
    EnvelopeError,
    created_ms,
    decode_envelope,
    safe_attempt,
    safe_job_id,
    trace_context,
)
from jobstream.schema.text import as_text
from jobstream.streams import semconv as sc
from jobstream.streams.errors import PermanentError, RetryableError
from jobstream.streams.job import Delivery, Job, Result
from jobstream.streams.keys import base_queue
from jobstream.streams.policy import Policy, backoff_s
from jobstream.streams.status import Outcome, Reason

__all__ = [
    "BatchHandler",
    "Handler",
    "Route",
    "cancelled_result",
    "classify",
    "conclude",
    "consumer_span",
    "invalid_result",
    "prepare",
    "retry_fields",
]

logger = logging.getLogger("streams.jobs")
_tracer = trace.get_tracer("jobstream.worker")
_ROOT = otel_context.Context()
_MAX_ERROR = 4000  # an exception's text is the decoder's; a job's error stays readable
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # one line in logs, PostgreSQL takes no NUL

Handler = Callable[[Any, Job], Awaitable[Any]]
BatchHandler = Callable[[Sequence[tuple[Any, Job]]], Awaitable[Sequence[Any]]]
"""Runs many jobs of a queue at once: one outcome per job, in order, each the job's result
or the exception that fails it (`RetryableError`, `PermanentError`, anything else)."""


@dataclass(frozen=True, slots=True)
class Route:
    """A queue's handler as the engine sees it: decode bytes, run, with a policy."""

    queue: str
    decode: Callable[[bytes], Any]
    handle: Handler
    policy: Policy
    handle_batch: BatchHandler | None = None
    """Set for a queue whose handler takes batches (`streams.batch`); `handle` then runs
    one job as a batch of one."""


def classify(exc: BaseException, attempt: int, policy: Policy) -> tuple[Outcome, Reason | None]:
    """Outcome and dead-letter reason (None: not dead-lettered) of a failed attempt."""
    if isinstance(exc, PermanentError | msgspec.DecodeError | asyncpg.DataError):
        return Outcome.FAILED, Reason.PERMANENT  # what PostgreSQL refuses it always will
    if attempt >= policy.max_attempts:
        return Outcome.FAILED, Reason.EXHAUSTED
    return Outcome.RETRYING, None  # RetryableError, TimeoutError and anything unforeseen


MAX_RETRY_EXTRA_FIELDS = 100
"""Fields beyond the contract's a retry keeps: its delayed member must stay small enough
for the promotion script to publish it in one command."""
_CONTRACT_FIELDS = frozenset(
    {b"payload", b"id", b"attempt", b"traceparent", b"tracestate", b"created_ms"}
)
MAX_RETRY_AFTER_S = 86_400.0
"""The longest a handler's retry-after hint may defer a job beyond its policy's backoff cap."""


def retry_fields(d: Delivery, job_id: str, attempt: int) -> dict[str, str]:
    """Fields of the retry entry: the original ones with the job id, `attempt + 1` and the
    job's `created_ms` (its time partition in PostgreSQL, whatever the retry entry's ID).

    Other fields than the contract's are kept up to `MAX_RETRY_EXTRA_FIELDS`; how many
    were left out is in `dropped_fields`.
    """
    out: dict[str, str] = {}
    extra = dropped = 0
    for k, v in d.fields.items():
        if k not in _CONTRACT_FIELDS:
            if extra >= MAX_RETRY_EXTRA_FIELDS:
                dropped += 1
                continue
            extra += 1
        out[as_text(k)] = as_text(v)
    out["id"] = job_id
    out["attempt"] = str(attempt + 1)
    out["created_ms"] = str(created_ms(d.entry_id, d.fields))
    if dropped:
        out["dropped_fields"] = str(dropped)
    return out


def retry_after_s(hint: float, policy: Policy) -> float:
    """A handler's retry-after hint within sane bounds: NaN, negative or not a number
    counts as none; none defers longer than max(backoff_cap_s, MAX_RETRY_AFTER_S), inf
    included (an unbounded time would wedge the recorder's delayed-set write)."""
    try:
        hint = float(hint)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(hint) or hint <= 0:
        return 0.0
    return min(hint, max(policy.backoff_cap_s, MAX_RETRY_AFTER_S))


def invalid_result(
    d: Delivery, error: str, payload: bytes | None = None, reason: Reason = Reason.INVALID
) -> Result:
    """A failed, dead-lettered outcome for an entry that could not be decoded or routed
    (or, with `reason`, must not run again).

    Total: whatever the entry's fields hold, it returns (their id and attempt only if valid).
    """
    now = time.time()
    return Result.failed(
        d,
        safe_job_id(d.entry_id, d.fields),
        safe_attempt(d.fields),
        reason=reason,
        error=scrub(_CONTROL.sub(" ", error[:_MAX_ERROR])),
        payload=payload,
        started_at=now,
        finished_at=now,
        executed=False,
    )


def prepare(route: Route, d: Delivery, max_payload_bytes: int) -> tuple[Envelope, Any] | Result:
    """Decode an entry for its route; an invalid entry yields its failed Result instead.

    Total: for any field map it returns one or the other and raises nothing.
    """
    try:
        env = decode_envelope(d.entry_id, d.fields)
    except EnvelopeError as exc:
        return invalid_result(d, f"invalid entry: {exc}")
    except Exception as exc:  # parser boundary: no entry may escape as an exception
        logger.exception("decoding entry %s failed unexpectedly", d.entry_id)
        return invalid_result(d, f"invalid entry: {type(exc).__name__}: {exc}")
    if len(env.payload) > max_payload_bytes:
        return invalid_result(
            d, f"invalid entry: payload is {len(env.payload)} bytes, at most {max_payload_bytes}"
        )
    what = f"invalid payload for {base_queue(route.queue)}"
    try:
        return env, route.decode(env.payload)
    except msgspec.ValidationError as exc:
        return invalid_result(d, f"{what}: {exc}", env.payload)
    except msgspec.DecodeError as exc:
        return invalid_result(d, f"{what}: not JSON ({exc})")
    except RecursionError:
        return invalid_result(d, f"{what}: nested deeper than the decoder's recursion limit")
    except Exception as exc:  # parser boundary: a queue's decoder may raise anything
        return invalid_result(d, f"{what}: {type(exc).__name__}: {exc}")


async def execute(
    route: Route, env: Envelope, payload: Any, job: Job, d: Delivery, *, watched: bool = False
) -> Result:
    """Run the handler once; return the attempt's Result. Only cancellation escapes, but
    for a cancellation by request (`d.cancel_requested`), which becomes the outcome.

    The handler runs under the policy's timeout: its own `asyncio.timeout`, or, when
    `watched`, the engine's watchdog, which cancels the task running `d` once its time is
    up after setting `d.timed_out` (no timer per job; see `Engine._watch`).
    """
    started = time.time()
    mono = time.perf_counter()
    value: Any = None
    exc: Exception | None = None
    try:
        if watched:
            value = await route.handle(payload, job)
        else:
            async with asyncio.timeout(route.policy.timeout_s):
                value = await route.handle(payload, job)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if d.cancel_requested and not d.timed_out:  # an operator's `jobstream job cancel`
            if task is not None:
                task.uncancel()  # handled: settlement goes on in this task
            return cancelled_result(d, job.id, job.attempt, env.payload, started, mono)
        if not d.timed_out:  # the worker's own cancellation (shutdown): it propagates
            raise
        if task is not None:
            task.uncancel()  # the watchdog's request, answered here
        exc = TimeoutError()
    except Exception as e:  # CancelledError is not an Exception: it propagates
        exc = e
    return conclude(route, env, job, d, value, exc, started, mono)


def conclude(
    route: Route,
    env: Envelope,
    job: Job,
    d: Delivery,
    value: Any,
    exc: Exception | None,
    started: float,
    mono: float,
) -> Result:
    """The Result of one attempt that returned `value` or raised `exc`: classified, its
    retry planned, its result encoded (one that is not JSON fails the job for good)."""
    error: str | None = None
    if isinstance(exc, TimeoutError):
        error = f"TimeoutError: handler exceeded its {route.policy.timeout_s:g}s timeout"
    elif exc is not None:
        error = scrub(f"{type(exc).__name__}: {exc}")  # libraries' messages may quote URLs
    result_json: str | None = None
    if exc is None and value is not None:
        try:
            result_json = msgspec.json.encode(value).decode()
        except (TypeError, msgspec.EncodeError) as e:
            exc = PermanentError(f"handler result is not JSON-encodable: {e}")
            error = scrub(f"PermanentError: {exc}")
    finished = time.time()
    duration_ms = round((time.perf_counter() - mono) * 1000)
    if exc is None:
        return Result.completed(
            d, job, payload=env.payload, result_json=result_json,
            started_at=started, finished_at=finished, duration_ms=duration_ms,
        )  # fmt: skip
    _, reason = classify(exc, job.attempt, route.policy)
    if reason is not None:  # dead-lettered
        return Result.failed(
            d, job.id, job.attempt, reason=reason, error=str(error), payload=env.payload,
            exception=exc, started_at=started, finished_at=finished, duration_ms=duration_ms,
        )  # fmt: skip
    wait = backoff_s(route.policy, job.attempt)
    if isinstance(exc, RetryableError) and exc.retry_after_s is not None:
        wait = max(wait, retry_after_s(exc.retry_after_s, route.policy))
    return Result.retry(
        d, job, payload=env.payload, error=str(error), exception=exc,
        started_at=started, finished_at=finished, duration_ms=duration_ms,
        retry_at=finished + wait, retry_fields=retry_fields(d, job.id, job.attempt),
    )  # fmt: skip


def cancelled_result(
    d: Delivery,
    job_id: str,
    attempt: int,
    payload: bytes | None,
    started: float,
    mono: float,
    *,
    error: str = "cancelled by request while running",
    executed: bool = True,
) -> Result:
    """The outcome of an attempt cancelled by request: recorded `cancelled`, acked, no retry
    (`executed=False`: cancelled before its handler ran)."""
    return Result(
        d,
        job_id,
        attempt,
        Outcome.CANCELLED,
        payload=payload,
        error=error,
        reason=Reason.CANCELLED,
        executed=executed,
        started_at=started,
        finished_at=time.time(),
        duration_ms=round((time.perf_counter() - mono) * 1000),
    )


def _attributes(attrs: dict[str, Any], d: Delivery, job_id: str) -> dict[str, Any]:
    """The queue's constant span attributes plus this delivery's own."""
    return {
        **attrs,
        sc.MESSAGE_ID: d.entry_id,
        sc.CONVERSATION_ID: job_id,
        sc.DELIVERY_COUNT: d.delivery_count,
    }


def consumer_span(
    name: str,
    context: otel_context.Context | None,
    attributes: dict[str, Any],
    links: Sequence[trace.Link],
) -> AbstractContextManager[trace.Span]:
    """A CONSUMER span, made current, in `context` (None: a new trace, whatever runs the
    engine). It records no exception and sets no status by itself: the results say how
    the jobs ended, and the caller marks the span from them."""
    return _tracer.start_as_current_span(
        name,
        context=context or _ROOT,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    )


async def execute_traced(
    route: Route,
    env: Envelope,
    payload: Any,
    job: Job,
    d: Delivery,
    attrs: dict[str, Any],
    around: Callable[[Result | None], None],
    *,
    watched: bool = False,
) -> Result:
    """`execute` inside a CONSUMER span that is a child of, and links to, the producer's.

    `around(None)` runs first and `around(result)` last, both inside the span, so the
    job's start and end log lines carry its trace id.
    """
    parent = extract(env.traceparent, env.tracestate)
    name = f"process {attrs[sc.DESTINATION]}"
    unsampled = presample(parent, name)
    if unsampled is not None:  # no span to build: run under the unsampled context only
        token = otel_context.attach(unsampled)
        try:
            around(None)
            res = await execute(route, env, payload, job, d, watched=watched)
            around(res)
            return res
        finally:
            otel_context.detach(token)
    links = []
    if parent is not None:
        ctx = trace.get_current_span(parent).get_span_context()
        if ctx.is_valid:
            links.append(trace.Link(ctx))
    attributes = {**_attributes(attrs, d, job.id), sc.JOB_ATTEMPT: job.attempt}
    with consumer_span(name, parent, attributes, links) as span:
        if job.reporter is not None:  # progress events go on this span
            job.reporter.span = span
        around(None)
        res = await execute(route, env, payload, job, d, watched=watched)
        if res.outcome is Outcome.CANCELLED:
            span.add_event("cancelled", {"jobstream.reason": "cancelled by request"})
        if res.exception is not None:
            span.record_exception(res.exception, exception_attributes(res.exception))
            span.set_attribute(sc.ERROR_TYPE, type(res.exception).__qualname__)
            span.set_status(trace.StatusCode.ERROR, res.error)
            if res.outcome is Outcome.RETRYING:
                span.add_event("retry scheduled", {"jobstream.retry_at": res.retry_at or 0.0})
            else:
                span.add_event("dead-lettered", {"jobstream.reason": res.reason or ""})
        around(res)
        return res


def trace_invalid(res: Result, attrs: dict[str, Any]) -> Result:
    """A CONSUMER span for an entry that never reached its handler, marked as an error;
    return the result with the span's trace id."""
    d = res.delivery
    parent = extract(*trace_context(d.fields))
    with _tracer.start_as_current_span(
        f"process {attrs[sc.DESTINATION]}",
        context=parent or _ROOT,
        kind=trace.SpanKind.CONSUMER,
        attributes={**_attributes(attrs, d, res.job_id), sc.ERROR_TYPE: "InvalidEntry"},
    ) as span:
        span.set_status(trace.StatusCode.ERROR, res.error)
        span.add_event("dead-lettered", {"jobstream.reason": res.reason or Reason.INVALID})
        trace_id = trace_id_of(sampled_only=True) or trace_id_of(trace_context(d.fields)[0])
    return dataclasses.replace(res, trace_id=trace_id)

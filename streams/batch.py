"""Batch handlers: one call runs many jobs of a queue and returns one outcome per job.

Everything else stays per job: each job's `running` record, its Result (status row,
execution row, retry or dead letter, ack) and its log lines. A whole batch that fails
(raises, times out, or answers with the wrong number of outcomes) is run again job by job,
so only the guilty job fails. Generic: it knows nothing of any queue in particular.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from jobstream.otel import extract, presample
from jobstream.otel.redact import exception_attributes, scrub
from jobstream.schema.envelope import Envelope
from jobstream.streams import semconv as sc
from jobstream.streams.dispatch import (
    BatchHandler,
    Handler,
    Route,
    conclude,
    consumer_span,
    execute,
)
from jobstream.streams.errors import PermanentError
from jobstream.streams.job import Delivery, Job, Outcome, Result

__all__ = ["BatchError", "Item", "execute_batch", "execute_batch_traced", "single"]


class BatchError(PermanentError):
    """A batch handler answered with a number of outcomes other than its jobs'."""


@dataclass(slots=True)
class Item:
    """One decoded job waiting in, or running in, a batch."""

    delivery: Delivery
    env: Envelope
    payload: Any
    job: Job


def single(batch: BatchHandler) -> Handler:
    """`batch` as a handler of one job: its outcome returned, or raised when an exception."""

    async def handle(payload: Any, job: Job) -> Any:
        outcomes = await batch([(payload, job)])
        if len(outcomes) != 1:
            raise BatchError(f"batch handler returned {len(outcomes)} outcomes for 1 job")
        outcome = outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return handle


async def execute_batch(
    route: Route, items: Sequence[Item], on_fallback: Callable[[Exception], None] | None = None
) -> list[Result]:
    """Run `items` in one call of the route's batch handler; one Result per item, in order.

    The batch runs under the policy's timeout. If the call itself fails, each job runs
    again alone, concurrently, under its own timeout (`on_fallback(error)` is told first).
    Only cancellation escapes.
    """
    assert route.handle_batch is not None
    started = time.time()
    mono = time.perf_counter()
    try:
        async with asyncio.timeout(route.policy.timeout_s):
            outcomes = await route.handle_batch([(it.payload, it.job) for it in items])
        if len(outcomes) != len(items):
            raise BatchError(
                f"batch handler returned {len(outcomes)} outcomes for {len(items)} jobs"
            )
    except Exception as exc:  # the batch's exception boundary: its jobs go on alone
        if len(items) == 1:  # alone already: the error is the job's own
            it = items[0]
            return [conclude(route, it.env, it.job, it.delivery, None, exc, started, mono)]
        if on_fallback is not None:
            on_fallback(exc)
        return list(
            await asyncio.gather(
                *(execute(route, it.env, it.payload, it.job, it.delivery) for it in items)
            )
        )
    results = []
    for it, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, Exception):
            res = conclude(route, it.env, it.job, it.delivery, None, outcome, started, mono)
        elif isinstance(outcome, BaseException):  # not a job's outcome: let it through
            raise outcome
        else:
            res = conclude(route, it.env, it.job, it.delivery, outcome, None, started, mono)
        results.append(res)
    return results


def _link(it: Item) -> trace.Link | None:
    """A link to the job's producer context, carrying the job's own attributes."""
    parent = extract(it.env.traceparent, it.env.tracestate)
    if parent is None:
        return None
    ctx = trace.get_current_span(parent).get_span_context()
    if not ctx.is_valid:
        return None
    return trace.Link(ctx, _job_attributes(it))


def _job_attributes(it: Item) -> dict[str, Any]:
    d = it.delivery
    return {
        sc.MESSAGE_ID: d.entry_id,
        sc.CONVERSATION_ID: it.job.id,
        sc.DELIVERY_COUNT: d.delivery_count,
        sc.JOB_ATTEMPT: it.job.attempt,
    }


async def execute_batch_traced(
    route: Route,
    items: Sequence[Item],
    attrs: dict[str, Any],
    around: Callable[[Sequence[Result] | None], None],
) -> list[Result]:
    """`execute_batch` inside one CONSUMER `process` span for the whole batch.

    Following the OpenTelemetry messaging conventions for batches, the span is a root
    with `messaging.batch.message_count` and one link per job to its producer's context;
    each link carries the job's attributes (entry id, job id, delivery count, attempt).
    A job that fails adds an event with the same attributes, its error and what happens
    next, and marks the span as an error. `around(None)` runs first and `around(results)`
    last, both inside the span, so the jobs' log lines carry its trace id.
    """
    name = f"process {attrs[sc.DESTINATION]}"
    unsampled = presample(None, name)
    if unsampled is not None:  # not sampled: no span, no links to build
        token = otel_context.attach(unsampled)
        try:
            around(None)
            results = await execute_batch(route, items)
            around(results)
            return results
        finally:
            otel_context.detach(token)
    links = [link for it in items if (link := _link(it)) is not None]
    attributes = {**attrs, sc.BATCH_MESSAGE_COUNT: len(items)}
    with consumer_span(name, None, attributes, links) as span:  # a root: one trace a batch
        around(None)

        def fell_back(exc: Exception) -> None:
            span.add_event(
                "batch failed, jobs run one by one",
                {sc.ERROR_TYPE: type(exc).__qualname__, "exception.message": scrub(str(exc))},
            )

        results = await execute_batch(route, items, fell_back)
        failed: list[str] = []
        for it, res in zip(items, results, strict=True):
            if res.exception is None:
                continue
            failed.append(type(res.exception).__qualname__)
            event = {
                **_job_attributes(it),
                **exception_attributes(res.exception),
                sc.ERROR_TYPE: failed[-1],
            }
            if res.outcome is Outcome.RETRYING:
                at = res.retry_at or 0.0
                span.add_event("retry scheduled", {**event, "jobstream.retry_at": at})
            else:
                span.add_event("dead-lettered", {**event, "jobstream.reason": res.reason or ""})
        if failed:  # "errors only" finds the batch; its events say which jobs
            span.set_attribute(sc.ERROR_TYPE, failed[0])
            span.set_status(trace.StatusCode.ERROR, f"{len(failed)} of {len(items)} jobs failed")
        around(results)
        return results

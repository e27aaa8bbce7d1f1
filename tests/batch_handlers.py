"""A test-only queue served by a batch handler that misbehaves on demand, job by job."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, batch_handler
from jobstream.streams import Job, PermanentError, Policy, RetryableError

QUEUE = "test-batch"


class Part(msgspec.Struct, frozen=True, kw_only=True):
    """What the batch handler does with this job, or with the whole batch it is in."""

    permanent: bool = False  # this job's outcome is a PermanentError
    retry_times: int = 0  # this job's outcome is a RetryableError on its first N attempts
    poison: bool = False  # the whole batch raises while this job is in it
    hang: bool = False  # the whole batch runs past its timeout while this job is in it
    short: bool = False  # the handler answers one outcome too few while this job is in it


def batches_key(deps: Deps) -> str:
    return f"{deps.keys.prefix}batches"


def runs_key(deps: Deps) -> str:
    return f"{deps.keys.prefix}runs"


@batch_handler(
    QUEUE,
    Part,
    Policy(
        max_attempts=2, backoff_base_s=0.05, backoff_cap_s=0.1, timeout_s=1.0,
        concurrency=64, batch_size=10, batch_wait_s=0.05,
    ),
)  # fmt: skip
async def run_parts(jobs: Sequence[tuple[Part, Job]], deps: Deps) -> list[Any]:
    """Note the batch (its job ids) and each job's run, then do what the parts say."""
    ids = [job.id for _, job in jobs]
    pipe = deps.redis.pipeline(transaction=False)
    pipe.rpush(batches_key(deps), msgspec.json.encode(ids))
    for job_id in ids:
        pipe.hincrby(runs_key(deps), job_id, 1)
    await pipe.execute()
    parts = [part for part, _ in jobs]
    if any(p.poison for p in parts):
        raise PermanentError("poisoned batch")
    if any(p.hang for p in parts):
        await asyncio.sleep(30)
    outcomes: list[Any] = []
    for part, job in jobs:
        if part.permanent:
            outcomes.append(PermanentError(f"job {job.id} refused for good"))
        elif job.attempt <= part.retry_times:
            outcomes.append(RetryableError(f"transient failure on attempt {job.attempt}"))
        else:
            outcomes.append({"batch": len(jobs), "attempt": job.attempt})
    if any(p.short for p in parts):
        outcomes.pop()
    return outcomes


SPECS: tuple[HandlerSpec[Any], ...] = (run_parts,)
PAYLOADS = {QUEUE: Part}

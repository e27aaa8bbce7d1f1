"""Job control against the real Redis and PostgreSQL: cancel (waiting, delayed, running,
over), unique publishes (also raced), and progress (hash, `jobstream job`, span events)
(DESIGN.md 1, 2, 3, 9: a cancelled job is terminal in both stores, acked after its record)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator

import msgspec
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import Job, Policy, Publisher
from jobstream.streams.cancel import Cancelled, cancel_job
from tests import handlers
from tests.helpers import REDIS_URL, event, eventually, in_memory_spans, jobstream, running

Q = handlers.QUEUE
PQ = "test-progress"


class Steps(msgspec.Struct, frozen=True, kw_only=True):
    """Report these fractions, then wait until the test says go (a Redis key exists)."""

    fractions: list[float]
    calls: int = 1  # report each fraction this many times (coalesced)
    gate: str = ""


@handler(PQ, Steps, Policy(max_attempts=1, timeout_s=30, concurrency=4))
async def steps(s: Steps, job: Job, deps: Deps) -> dict[str, int]:
    for i, f in enumerate(s.fractions):
        for _ in range(s.calls):
            job.progress(f, f"step {i + 1} of {len(s.fractions)}")
    while s.gate and not await deps.redis.exists(s.gate):  # noqa: ASYNC110 (another process)
        await asyncio.sleep(0.02)
    return {"steps": len(s.fractions)}


def publisher(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**PAYLOADS, **handlers.PAYLOADS, PQ: Steps})


def engine(deps: Deps, **kw):
    return make_engine(deps, handlers=[*HANDLERS, *handlers.SPECS, steps], **kw)


async def status_of(deps: Deps, job_id: str) -> str | None:
    status: str | None = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    return status


async def hash_of(deps: Deps, job_id: str) -> dict[str, str]:
    raw = await deps.redis.hgetall(deps.keys.job(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def ran(deps: Deps, job_id: str) -> int:
    n = await deps.redis.hget(handlers.executions_key(deps), job_id)
    return int(n or 0)


def status_is(deps: Deps, job_id: str, want: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await status_of(deps, job_id) == want

    return check


# ---- cancel ----------------------------------------------------------------------------


async def test_cancel_of_a_queued_job_records_it_cancelled_and_it_never_runs(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    pub = publisher(deps)
    doomed = await pub.publish(Q, handlers.Work(), "doomed")
    out = await jobstream(env_for(), "job", "cancel", doomed)
    assert out.returncode == 0, out.stderr
    assert "cancelled job doomed of test-work: it was waiting and will not run" in out.stdout
    assert await status_of(deps, doomed) == "cancelled"
    assert (await hash_of(deps, doomed))["status"] == "cancelled"
    assert await deps.redis.xlen(deps.keys.stream(Q)) == 0  # never given to a consumer
    # The same id published again (an id is not a lock) is not run either.
    await deps.redis.xadd(deps.keys.stream(Q), {"id": doomed, "payload": "{}"})
    other = await pub.publish(Q, handlers.Work(), "other")
    async with running(engine(deps)):
        await eventually(status_is(deps, other, "completed"))
        await eventually(lambda: _pending_is_zero(deps))
    assert await ran(deps, doomed) == 0
    assert await status_of(deps, doomed) == "cancelled"
    assert (await hash_of(deps, doomed))["status"] == "cancelled"
    status = await jobstream(env_for(), "status", "--json")
    counts = {r["queue"]: r["jobs"] for r in json.loads(status.stdout)}
    # Its own creation time makes the second entry a row of its own, cancelled too.
    assert counts[Q] == {"cancelled": 2, "completed": 1}
    again = await jobstream(env_for(), "job", "cancel", doomed)
    assert again.returncode == 3
    assert again.stdout.strip() == "job doomed is already cancelled: nothing to cancel"


async def _pending_is_zero(deps: Deps) -> bool:
    info = await deps.redis.xpending(deps.keys.stream(Q), "workers")
    return int(info["pending"]) == 0


async def test_cancel_of_a_delayed_job_and_of_a_waiting_retry(deps: Deps):
    pub = publisher(deps)
    later = await pub.publish(Q, handlers.Work(), "later", delay_s=1.0)
    answer = await cancel_job(
        deps.redis, deps.pool, deps.keys, later, hash_ttl_s=deps.settings.hash_ttl_s
    )
    assert answer.outcome is Cancelled.CANCELLED
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0
    # A job waiting for its retry (backoff 30 s) is taken out of the delayed set too.
    slow = msgspec.structs.replace(
        deps.settings, policies='{"test-work": {"backoff_base_s": 30, "backoff_cap_s": 30}}'
    )
    flaky = await pub.publish(Q, handlers.Work(fail_times=1), "flaky")
    deps2 = dataclasses.replace(deps, settings=slow)
    async with running(engine(deps2)):
        await eventually(status_is(deps, flaky, "retrying"))
        answer = await cancel_job(
            deps.redis, deps.pool, deps.keys, flaky, hash_ttl_s=deps.settings.hash_ttl_s
        )
        assert answer.outcome is Cancelled.CANCELLED
        await asyncio.sleep(1.5)  # past the first job's due time: nothing was left to run
    assert await ran(deps, later) == 0
    assert await ran(deps, flaky) == 1
    assert await status_of(deps, later) == "cancelled"
    assert await status_of(deps, flaky) == "cancelled"
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0


async def test_cancel_of_a_job_waiting_in_another_partition_runs_per_slot(deps: Deps):
    # Partition 1 is a slot of its own: the request goes to the queue's cancellations, the
    # entry is deleted by a script in partition 1's slot; the workers of both skip it.
    pub = Publisher(deps.redis, deps.keys, {**PAYLOADS, **handlers.PAYLOADS}, partitions={Q: 2})
    ids = [await pub.publish(Q, handlers.Work(), f"part-{i}") for i in range(2)]
    part1 = deps.keys.stream(deps.keys.part(Q, 1))
    assert await deps.redis.xlen(part1) == 1
    for job_id in ids:
        answer = await cancel_job(
            deps.redis, deps.pool, deps.keys, job_id, hash_ttl_s=deps.settings.hash_ttl_s
        )
        assert answer.outcome is Cancelled.CANCELLED
        assert await status_of(deps, job_id) == "cancelled"
    assert await deps.redis.xlen(part1) == 0
    assert await deps.redis.xlen(deps.keys.stream(Q)) == 0
    assert await deps.redis.xlen(deps.keys.cancels(Q)) == 2


async def test_cancel_of_a_running_job_cancels_its_handler_without_retry(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    pub = publisher(deps)
    long = await pub.publish(Q, handlers.Work(sleep_s=60), "long")
    async with running(engine(deps)) as e:
        await eventually(lambda: ran(deps, long))
        await eventually(status_is(deps, long, "running"))
        out = await jobstream(env_for(), "job", "cancel", long)
        assert out.returncode == 0, out.stderr
        assert f"cancel requested: job long of test-work is running on {e.cfg.consumer}" in (
            out.stdout
        )
        await eventually(status_is(deps, long, "cancelled"), timeout_s=10)
        await eventually(lambda: _pending_is_zero(deps))  # acked
        assert e.lanes[Q].running == {}
    row = await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", long)
    assert row["attempts"] == 1
    assert row["next_attempt_at"] is None
    execs = await deps.pool.fetch("SELECT outcome FROM job_executions WHERE job_id = $1", long)
    assert [x["outcome"] for x in execs] == ["cancelled"]
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0  # no retry
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0  # not a failure
    assert (await hash_of(deps, long))["status"] == "cancelled"
    assert await ran(deps, long) == 1


async def test_cancel_of_a_finished_or_unknown_job(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    pub = publisher(deps)
    done = await pub.publish(Q, handlers.Work(), "done")
    bad = await pub.publish(Q, handlers.Work(permanent=True), "bad")
    async with running(engine(deps)):
        await eventually(status_is(deps, done, "completed"))
        await eventually(status_is(deps, bad, "failed"))
    out = await jobstream(env_for(), "job", "cancel", done)
    assert (out.returncode, out.stdout.strip()) == (3, "job done is already completed: nothing to "
                                                        "cancel")  # fmt: skip
    out = await jobstream(env_for(), "job", "cancel", bad)
    assert (out.returncode, out.stdout.strip()) == (3, "job bad is already failed: nothing to "
                                                       "cancel")  # fmt: skip
    out = await jobstream(env_for(), "job", "cancel", "no-such-job")
    assert out.returncode == 1
    assert out.stderr.strip() == "jobstream: no job 'no-such-job' in PostgreSQL or Redis"
    assert await status_of(deps, done) == "completed"
    out = await jobstream(env_for(), "job", "other", "words")
    assert out.returncode == 2
    assert "unexpected argument 'words'" in out.stderr
    assert "Traceback" not in out.stderr


# ---- unique publishes ------------------------------------------------------------------


async def test_a_unique_id_is_refused_within_its_window_and_published_after(deps: Deps):
    pub = publisher(deps)
    first = await pub.publish_unique("analytics", event("u1"), "u1", 0.5)
    second = await pub.publish_unique("analytics", event("u1"), "u1", 0.5)
    assert first.published
    assert not second.published
    assert second.job_id == "u1"
    assert second.where == first.where  # the entry the first publish wrote
    assert await pub.publish("analytics", event("u1"), "u1", unique_for_s=0.5) == "u1"
    assert await deps.redis.xlen(deps.keys.stream("analytics")) == 1

    async def published_again() -> bool:
        return (await pub.publish_unique("analytics", event("u1"), "u1", 0.5)).published

    await eventually(published_again)
    assert await deps.redis.xlen(deps.keys.stream("analytics")) == 2
    later = [await pub.publish_unique(Q, handlers.Work(), "u2", 60, delay_s=30) for _ in "ab"]
    assert [x.published for x in later] == [True, False]
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 1


async def test_racing_producers_publish_one_entry_per_id(deps: Deps):
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(4)]
    try:
        pubs = [Publisher(c, deps.keys, PAYLOADS) for c in clients]
        ids = [f"race-{i}" for i in range(200)]
        results = []
        for i in ids:  # four producers, each on its own connection, race for each id
            results += await asyncio.gather(
                *(p.publish_unique("analytics", event(i), i, 60) for p in pubs)
            )
    finally:
        for c in clients:
            await c.aclose()
    won: dict[str, int] = {}
    for r in results:
        won[r.job_id] = won.get(r.job_id, 0) + int(r.published)
    assert won == dict.fromkeys(ids, 1)
    entries = await deps.redis.xrange(deps.keys.stream("analytics"))
    assert sorted(f[b"id"].decode() for _, f in entries) == sorted(ids)
    assert (await hash_of(deps, "race-7"))["status"] == "queued"


async def test_cli_publish_unique_for(deps: Deps, env_for: Callable[..., dict[str, str]]):
    env = env_for()
    payload = msgspec.json.encode(event("cli-u")).decode()
    args = ("publish", "analytics", payload, "--id", "cli-u", "--unique-for", "60")
    first, second = [await jobstream(env, *args) for _ in "ab"]
    assert (first.returncode, first.stdout.strip()) == (0, "cli-u")
    assert (second.returncode, second.stdout.strip()) == (3, "cli-u")
    assert "was published to analytics within the last 60s" in second.stderr
    assert "not published again" in second.stderr
    no_id = await jobstream(env, "publish", "analytics", payload, "--unique-for", "60")
    assert no_id.returncode == 2
    assert no_id.stderr.strip() == "jobstream: --unique-for needs --id (the id that must be unique)"
    bad = await jobstream(env, *args[:-1], "soon")
    assert bad.returncode == 2
    assert "must be 0.001 to 31622400 seconds" in bad.stderr
    assert await deps.redis.xlen(deps.keys.stream("analytics")) == 1


# ---- progress --------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with in_memory_spans() as exporter:
        yield exporter


async def test_progress_shows_in_the_hash_the_job_command_and_the_span(
    deps: Deps, env_for: Callable[..., dict[str, str]], spans: InMemorySpanExporter
):
    assert not inspect.iscoroutinefunction(Job.progress)  # no I/O in a call
    gate = f"{deps.keys.prefix}go"
    job_id = await publisher(deps).publish(
        PQ, Steps(fractions=[0.25, 0.5, 0.75], calls=10, gate=gate), "p1"
    )
    async with running(engine(deps)) as e:

        async def shown() -> bool:
            return (await hash_of(deps, job_id)).get("progress") == "0.75"

        await eventually(shown)
        h = await hash_of(deps, job_id)
        assert h["status"] == "running"
        assert h["progress_note"] == "step 3 of 3"
        out = await jobstream(env_for(), "job", job_id)
        assert "progress: 0.75" in out.stdout
        assert "progress_note: step 3 of 3" in out.stdout
        await deps.redis.set(gate, "1")
        await eventually(status_is(deps, job_id, "completed"))
        assert e.recorder.progress.due is False
    assert (await hash_of(deps, job_id))["progress"] == "0.75"  # kept after the end
    (span,) = [s for s in spans.get_finished_spans() if s.name.startswith("process ")]
    events = [ev for ev in span.events if ev.name == "progress"]
    assert len(events) == 30  # every call, though the hash got only the latest
    assert [ev.attributes["jobstream.progress"] for ev in events[::10]] == [0.25, 0.5, 0.75]


async def test_progress_refuses_a_fraction_outside_0_to_1(deps: Deps):
    job_id = await publisher(deps).publish(PQ, Steps(fractions=[0.5, 1.5]), "p-bad")
    async with running(engine(deps)):
        await eventually(status_is(deps, job_id, "failed"))
    error = await deps.pool.fetchval("SELECT error FROM jobs WHERE id = $1", job_id)
    assert "progress must be a number from 0 to 1, not 1.5" in error

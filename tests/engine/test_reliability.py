"""Invariants under faults: retries, dead letters, timeouts, reclaim, drain (DESIGN.md 1-8)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from typing import Any

import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Policy, Publisher, trim
from tests import handlers
from tests.helpers import (
    SLOW_Q,
    all_terminal,
    eventually,
    executions,
    running,
    slow,
    statuses,
    work_publisher,
)

Q = handlers.QUEUE
# Every test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


def pub(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**handlers.PAYLOADS, SLOW_Q: handlers.Work})


def engine(deps: Deps, **settings: Any):
    if settings:
        deps = dataclasses.replace(
            deps, settings=msgspec.structs.replace(deps.settings, **settings)
        )
    return make_engine(deps, None, None, handlers=(*handlers.SPECS, slow))


async def job_row(deps: Deps, job_id: str) -> Any:
    return await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)


async def dead_letters(deps: Deps, queue: str = Q) -> list[dict[str, str]]:
    entries = await deps.redis.xrange(deps.keys.dead(queue))
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]


async def test_retryable_failures_are_retried_then_complete(deps: Deps):
    job_id = await pub(deps).publish(Q, handlers.Work(fail_times=2))
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [job_id]))
    row = await job_row(deps, job_id)
    assert row["status"] == "completed"
    assert row["attempts"] == 3
    assert row["next_attempt_at"] is None
    execs = await deps.pool.fetch(
        "SELECT attempt, outcome, error FROM job_executions WHERE job_id = $1 ORDER BY attempt",
        job_id,
    )
    assert [(e["attempt"], e["outcome"]) for e in execs] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "completed"),
    ]
    assert "transient failure on attempt 1" in execs[0]["error"]
    assert await executions(deps) == {job_id: 3}
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0


async def test_retrying_state_is_recorded_with_next_attempt(deps: Deps):
    job_id = await pub(deps).publish(Q, handlers.Work(fail_times=1))
    eng = engine(deps)
    # A long backoff so the retrying state can be observed.
    eng.lanes[Q].route = dataclasses.replace(
        eng.lanes[Q].route,
        policy=Policy(max_attempts=3, backoff_base_s=30, backoff_cap_s=30, concurrency=4),
    )
    async with running(eng):

        async def retrying():
            row = await job_row(deps, job_id)
            return row is not None and row["status"] == "retrying"

        await eventually(retrying)
        row = await job_row(deps, job_id)
        assert row["next_attempt_at"] is not None
        assert await deps.redis.zcard(deps.keys.delayed(Q)) == 1
        assert (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0
        assert await deps.redis.hget(deps.keys.job(job_id), "status") == b"retrying"


async def test_permanent_error_fails_and_dead_letters_with_original_fields(deps: Deps):
    job_id = await pub(deps).publish(Q, handlers.Work(permanent=True))
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [job_id]))
    row = await job_row(deps, job_id)
    assert row["status"] == "failed"
    assert row["attempts"] == 1
    assert "refused for good" in row["error"]
    [letter] = await dead_letters(deps)
    assert letter["reason"] == "permanent"
    assert letter["job_id"] == job_id
    assert letter["id"] == job_id
    assert msgspec.json.decode(letter["payload"])["permanent"] is True
    assert letter["attempts"] == "1"
    assert letter["failed_at"].endswith("Z")
    assert "refused for good" in letter["error"]


async def test_exhausted_attempts_and_unforeseen_errors_dead_letter(deps: Deps):
    p = pub(deps)
    flaky = await p.publish(Q, handlers.Work(fail_times=10))
    boom = await p.publish(Q, handlers.Work(boom=True))
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [flaky, boom]))
    for job_id in (flaky, boom):
        row = await job_row(deps, job_id)
        assert row["status"] == "failed"
        assert row["attempts"] == 3
    letters = {d["job_id"]: d for d in await dead_letters(deps)}
    assert letters[flaky]["reason"] == "exhausted"
    assert "ZeroDivisionError" in letters[boom]["error"]
    assert await executions(deps) == {flaky: 3, boom: 3}


async def test_handler_timeout_is_recorded_and_retried(deps: Deps):
    job_id = await pub(deps).publish(SLOW_Q, handlers.Work(sleep_s=5))
    started = time.monotonic()
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [job_id]))
    assert time.monotonic() - started < 4  # cancelled, not waited for
    execs = await deps.pool.fetch(
        "SELECT outcome, error FROM job_executions WHERE job_id = $1 ORDER BY attempt", job_id
    )
    assert [e["outcome"] for e in execs] == ["retrying", "failed"]
    assert all("exceeded its 0.3s timeout" in e["error"] for e in execs)
    assert (await dead_letters(deps, SLOW_Q))[0]["reason"] == "exhausted"


async def test_delayed_publish_runs_only_when_due(deps: Deps):
    job_id = await pub(deps).publish(Q, handlers.Work(), delay_s=1.5)
    async with running(engine(deps)):
        await asyncio.sleep(0.8)
        assert await executions(deps) == {}
        assert await deps.redis.zcard(deps.keys.delayed(Q)) == 1
        await eventually(lambda: all_terminal(deps, [job_id]))
    assert await executions(deps) == {job_id: 1}


async def test_entry_delivered_too_often_is_dead_lettered(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    eid = (await deps.redis.xadd(stream, {"id": "crasher", "payload": "{}"})).decode()
    await deps.redis.xreadgroup("workers", "ghost-0", {stream: ">"})
    for i in range(1, 6):  # five more replicas took it and died
        await deps.redis.xclaim(stream, "workers", f"ghost-{i}", 0, [eid])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ["crasher"]))
    assert await executions(deps) == {}
    [letter] = await dead_letters(deps)
    assert letter["reason"] == "deliveries"
    assert "max_deliveries 5" in letter["error"]


async def test_restarted_worker_resumes_its_own_pending_first(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = await pub(deps).publish_many(Q, [handlers.Work() for _ in range(3)])
    await deps.redis.xreadgroup("workers", "stable-1", {stream: ">"})  # then it crashed
    await deps.redis.set(deps.keys.alive("stable-1"), "1", px=60_000)  # still looks alive
    async with running(engine(deps, consumer_name="stable-1")):
        await eventually(lambda: all_terminal(deps, ids))
    assert await executions(deps) == {i: 1 for i in ids}


async def test_gone_consumers_holding_nothing_are_removed(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await deps.redis.xreadgroup("workers", "gone-1", {stream: ">"})
    await asyncio.sleep(1.2)  # idle past the claim threshold
    eng = engine(deps)
    async with running(eng):

        async def removed():
            names = [c["name"] for c in await deps.redis.xinfo_consumers(stream, "workers")]
            return b"gone-1" not in names and eng.cfg.consumer.encode() in names

        await eventually(removed)


async def test_long_job_on_a_live_worker_is_never_stolen(deps: Deps):
    """A job running far past the ceiling stays with its live worker."""
    job_id = await pub(deps).publish(Q, handlers.Work(sleep_s=5))
    a = engine(deps, reclaim_ceiling_ms=1500)
    async with running(a):
        await eventually(lambda: executions(deps))
        b = engine(deps, reclaim_ceiling_ms=1500)
        async with running(b):
            await eventually(lambda: all_terminal(deps, [job_id]), timeout_s=20)
    assert await executions(deps) == {job_id: 1}
    assert (await job_row(deps, job_id))["worker_id"] == a.cfg.consumer


async def test_trim_keeps_everything_a_group_still_needs(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await deps.redis.xadd(stream, {"id": "held", "payload": "{}"})
    await deps.redis.xreadgroup("workers", "holder", {stream: ">"})  # pending, never acked
    await deps.redis.set(deps.keys.alive("holder"), "1", px=60_000)
    ids = await pub(deps).publish_many(Q, [handlers.Work() for _ in range(300)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
    assert await trim(deps.redis, deps.keys, Q) == 0  # the held entry pins the stream
    first: Any = await deps.redis.xrange(stream, count=1)
    await deps.redis.xack(stream, "workers", first[0][0])
    removed = await trim(deps.redis, deps.keys, Q)
    assert removed == 300  # all but the last-delivered entry
    assert await deps.redis.xlen(stream) == 1


async def test_default_settings_recover_a_crash_within_30_seconds():
    s = Settings()
    # A dead replica's key expires after alive_ttl; the next reclaim pass (every
    # reclaim_interval) takes its entries.
    assert s.alive_ttl_ms / 1000 + s.reclaim_interval_s <= 30
    assert s.reclaim_ceiling_ms == 3_600_000  # the safety net for anything else


async def spawn_worker(env: dict[str, str], *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.handlers", *extra, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_sigkilled_worker_jobs_are_reclaimed_by_a_live_one(deps: Deps, env_for):
    ids = await pub(deps).publish_many(Q, [handlers.Work(sleep_s=1.0) for _ in range(8)])
    proc = await spawn_worker(env_for())
    try:

        async def all_started():
            return len(await executions(deps)) == 8

        await eventually(all_started, timeout_s=30)
        proc.kill()  # SIGKILL mid-job: nothing recorded, nothing acked
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert set((await statuses(deps, ids)).values()) <= {"running"}
    t0 = time.monotonic()
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert await executions(deps) == {i: 2 for i in ids}
    assert (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0


async def test_sigterm_drains_in_flight_jobs_and_exits_zero(deps: Deps, env_for):
    ids = await pub(deps).publish_many(Q, [handlers.Work(sleep_s=1.0) for _ in range(5)])
    proc = await spawn_worker(env_for())

    async def all_started():
        return len(await executions(deps)) == 5

    await eventually(all_started, timeout_s=30)
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0
    assert b"draining 5 in-flight jobs" in out


async def test_grace_period_over_leaves_jobs_pending_for_others(deps: Deps, env_for):
    ids = await pub(deps).publish_many(Q, [handlers.Work(sleep_s=8) for _ in range(3)])
    proc = await spawn_worker(env_for(JOBSTREAM_SHUTDOWN_GRACE_S="0.5"))

    async def all_started():
        return len(await executions(deps)) == 3

    await eventually(all_started, timeout_s=30)
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, out.decode()
    assert b"left pending for other workers" in out
    assert (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 3
    assert set((await statuses(deps, ids)).values()) == {"running"}


async def test_a_retry_that_cannot_be_written_is_not_acked_and_is_written_later(deps: Deps):
    """inv. 1: the delayed set refuses the retry; the entry stays pending until it is written."""
    delayed = deps.keys.delayed(handlers.QUEUE)
    await deps.redis.set(delayed, "not a sorted set")  # ZADD now fails with WRONGTYPE
    job_id = await work_publisher(deps).publish(handlers.QUEUE, handlers.Work(fail_times=1))
    stream = deps.keys.stream(handlers.QUEUE)
    async with running(engine(deps)):

        async def retrying():
            return (await statuses(deps, [job_id])).get(job_id) == "retrying"

        await eventually(retrying)
        await asyncio.sleep(1.5)  # the settlement was tried again, and refused again
        assert (await deps.redis.xpending(stream, "workers"))["pending"] == 1
        await deps.redis.delete(delayed)
        await eventually(lambda: all_terminal(deps, [job_id]), timeout_s=20)
    assert (await statuses(deps, [job_id]))[job_id] == "completed"
    assert await executions(deps) == {job_id: 2}
    execs = await deps.pool.fetchval(
        "SELECT count(*) FROM job_executions WHERE job_id = $1", job_id
    )
    assert execs == 2  # one row per attempt, however often settlement was retried


async def test_burst_drains_what_is_ready_and_leaves_later_jobs(deps: Deps, env_for):
    p = work_publisher(deps)
    later = await p.publish(handlers.QUEUE, handlers.Work(), delay_s=3600)
    now = await p.publish_many(handlers.QUEUE, [handlers.Work() for _ in range(3)])
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.handlers", "--burst", env=env_for(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert time.monotonic() - started < 30
    assert set((await statuses(deps, now)).values()) == {"completed"}
    assert later not in await statuses(deps, [later])
    assert await deps.redis.zcard(deps.keys.delayed(handlers.QUEUE)) == 1

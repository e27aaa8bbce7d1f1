"""Lost replies: Redis ran the command, the worker never heard back (DESIGN inv. 1, 3, 4, 7, 10).

The worker talks to the real Redis through a loopback proxy (`tests.faults`) that lets the
server run one command, then drops its reply and resets the connection. Whatever reply is
lost, every job ends in exactly one terminal state in both stores (one `jobs` row, the
same status in its hash), and no job runs more often than its attempts:

- inv. 1 and 10: a lost settlement reply (the ack of a success, the retry of a failure)
  is sent again and changes nothing: the job is not run again, no second retry entry,
  and the worker's own lost ack is not mistaken for a stale attempt;
- inv. 4 and 10: entries delivered by a read whose reply was lost are pending to a
  consumer that never saw them; they are resumed and run once;
- inv. 7: the worker sees a dropped connection, waits and resumes by itself;
- a handler's publish whose reply was lost fails the attempt with a dropped connection
  (retryable): attempt 2 runs and publishes again, so the follow-up job is published
  twice (at-least-once, like any producer's retry) and runs once per entry; the
  publishing job still ends exactly once;
- the delayed-promotion script's lost reply moves no entry twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import redis.exceptions

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Engine, Job, Policy, Publisher, RetryableError
from jobstream.streams.redis_client import connect_redis, load_scripts
from tests.faults import Cut, ReplyCutter, reply_cutter
from tests.helpers import REDIS_URL, entry_seconds, eventually, running

Q = "test-lost-reply"
GROUP = "workers"

# Executions by (key prefix, job id), counted in this process: out of reach of the faults.
RUNS: collections.Counter[tuple[str, str]] = collections.Counter()


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """What the test handler does: fail the first N attempts, publish a follow-up job."""

    fail_times: int = 0
    follow_up: bool = False  # publish job `<id>-next` to this queue


@handler(Q, Step, Policy(max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1, timeout_s=10))
async def step(s: Step, job: Job, deps: Deps) -> dict[str, int]:
    """Count this execution, then fail or publish as asked. Not idempotent on purpose."""
    RUNS[(deps.keys.prefix, job.id)] += 1
    if job.attempt <= s.fail_times:
        raise RetryableError(f"transient failure on attempt {job.attempt}")
    if s.follow_up:
        await deps.publisher.publish(Q, Step(), f"{job.id}-next")
    return {"attempt": job.attempt}


def _sha(script: str) -> bytes:
    body = resources.files("jobstream.streams.lua").joinpath(script).read_bytes()
    return hashlib.sha1(body, usedforsecurity=False).hexdigest().encode()


SCRIPTS = ("settle.lua", "promote.lua")
SETTLE_SHA = _sha("settle.lua")
PROMOTE_SHA = _sha("promote.lua")


@pytest.fixture
async def proxy(deps: Deps) -> AsyncIterator[ReplyCutter]:
    """A reply-losing proxy to the test's Redis, its scripts loaded (so that a command
    whose reply is lost is one that ran, not one refused with NOSCRIPT)."""
    lua = resources.files("jobstream.streams.lua")
    await load_scripts(deps.redis, [lua.joinpath(n).read_bytes() for n in SCRIPTS])
    target = urlsplit(REDIS_URL)
    async with reply_cutter(target.hostname or "127.0.0.1", target.port or 6379) as p:
        yield p


@contextlib.asynccontextmanager
async def worker_via(proxy: ReplyCutter, settings: Settings) -> AsyncIterator[Engine]:
    """An engine serving the test queue whose every Redis command goes through `proxy`."""
    s = msgspec.structs.replace(settings, redis_url=proxy.url)
    async with connect(s) as wdeps, running(make_engine(wdeps, None, None, handlers=(step,))) as e:
        yield e


def publisher(deps: Deps) -> Publisher:
    """Publishes straight to Redis (never through the proxy)."""
    return Publisher(deps.redis, deps.keys, {Q: Step})


async def settled(deps: Deps, ids: list[str]) -> bool:
    """Every job terminal in PostgreSQL and nothing pending in the queue's group."""
    n = await deps.pool.fetchval(
        "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('completed', 'failed')", ids
    )
    if n < len(ids):
        return False
    summary: Any = await deps.redis.xpending(deps.keys.stream(Q), GROUP)
    return bool(summary["pending"] == 0)


async def assert_ends_once(deps: Deps, expect: dict[str, str]) -> None:
    """Each job has exactly one `jobs` row, with the expected status, and its hash agrees."""
    rows = await deps.pool.fetch("SELECT id, status FROM jobs WHERE id = ANY($1)", list(expect))
    assert sorted((r["id"], r["status"]) for r in rows) == sorted(expect.items())
    for job_id, status in expect.items():
        view = await deps.redis.hget(deps.keys.job(job_id), "status")
        assert view == status.encode(), f"hash of {job_id}: {view!r}, PostgreSQL: {status}"


async def recorded_runs(deps: Deps, ids: list[str]) -> dict[str, list[tuple[int, str]]]:
    """The `job_executions` rows of each job: (attempt, outcome), in attempt order."""
    rows = await deps.pool.fetch(
        "SELECT job_id, attempt, outcome FROM job_executions WHERE job_id = ANY($1)"
        " ORDER BY job_id, attempt, finished_at",
        ids,
    )
    out: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["job_id"], []).append((r["attempt"], r["outcome"]))
    return out


def runs(deps: Deps, ids: list[str]) -> dict[str, int]:
    return {i: RUNS[(deps.keys.prefix, i)] for i in ids}


async def lost(cut: Cut, timeout_s: float = 15) -> None:
    """Wait until the proxy lost the reply `cut` describes."""
    await asyncio.wait_for(cut.done.wait(), timeout_s)


async def test_the_proxy_loses_the_reply_of_a_command_that_ran(deps: Deps, proxy):
    """The fault itself: the command takes effect, its client sees only a reset."""
    key = f"{deps.keys.prefix}probe"
    cut = proxy.arm(b"INCRBY", arg=key.encode())  # how redis-py sends INCR
    client = connect_redis(proxy.url)
    try:
        assert await client.set(key, 41)  # other commands pass through
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.incr(key)
        assert cut.done.is_set()
        assert cut.cut == [[b"INCRBY", key.encode(), b"1"]]
        assert cut.replies == [b":42\r\n"]
        assert await deps.redis.get(key) == b"42"  # it ran, once
        assert await client.incr(key) == 43  # a new connection, nothing lost any more
    finally:
        await client.aclose()


async def test_a_lost_settlement_reply_runs_no_job_twice(deps: Deps, settings: Settings, proxy):
    """(a) The settle script acked ten successes; its reply was lost. The recorder sends
    it again, finds the entries acked, and nothing runs or is recorded twice."""
    cut = proxy.arm(b"EVALSHA", arg=SETTLE_SHA)
    ids = await publisher(deps).publish_many(Q, [Step() for _ in range(10)])
    async with worker_via(proxy, settings) as engine:
        await lost(cut)
        await eventually(lambda: settled(deps, ids), timeout_s=15)
    assert len(cut.cut) == 1
    assert engine.recorder.stale == 0  # its own lost ack is no attempt taken over
    await assert_ends_once(deps, dict.fromkeys(ids, "completed"))
    assert runs(deps, ids) == dict.fromkeys(ids, 1)
    assert await recorded_runs(deps, ids) == {i: [(1, "completed")] for i in ids}
    assert await deps.redis.xlen(deps.keys.stream(Q)) == len(ids)


async def test_entries_of_a_read_whose_reply_was_lost_run_once(
    deps: Deps, settings: Settings, proxy
):
    """(b) XREADGROUP delivered five entries, and its reply was lost: they are pending to
    this worker's consumer, which never saw them. It resumes them and runs each once."""
    stream = deps.keys.stream(Q)
    ids = await publisher(deps).publish_many(Q, [Step() for _ in range(5)])
    cut = proxy.arm(b"XREADGROUP", reply_has=stream.encode())
    async with worker_via(proxy, settings):
        await lost(cut)
        await eventually(lambda: settled(deps, ids), timeout_s=15)
    assert all(i.encode() in cut.replies[0] for i in ids)  # the first read took them all
    await assert_ends_once(deps, dict.fromkeys(ids, "completed"))
    assert runs(deps, ids) == dict.fromkeys(ids, 1)
    assert await recorded_runs(deps, ids) == {i: [(1, "completed")] for i in ids}
    # Each ran from its second delivery: the first one's reply never reached the worker.
    deliveries = await deps.pool.fetch(
        "SELECT DISTINCT delivery FROM job_executions WHERE job_id = ANY($1)", ids
    )
    assert [r["delivery"] for r in deliveries] == [2]


async def test_a_lost_retry_scheduling_reply_schedules_one_retry(
    deps: Deps, settings: Settings, proxy
):
    """(c) The settle script scheduled a failed attempt's retry (ZADD + XACK); its reply
    was lost. Sent again, it adds no second retry: two attempts, one per execution."""
    cut = proxy.arm(b"EVALSHA", arg=SETTLE_SHA)
    job_id = await publisher(deps).publish(Q, Step(fail_times=1))
    async with worker_via(proxy, settings) as engine:
        await lost(cut)
        await eventually(lambda: settled(deps, [job_id]), timeout_s=15)
        await asyncio.sleep(0.5)  # a second retry, if any, would be promoted by now
    assert engine.recorder.stale == 0
    await assert_ends_once(deps, {job_id: "completed"})
    assert runs(deps, [job_id]) == {job_id: 2}
    assert await recorded_runs(deps, [job_id]) == {job_id: [(1, "retrying"), (2, "completed")]}
    entries = await deps.redis.xrange(deps.keys.stream(Q))
    assert [f[b"attempt"] for _, f in entries[1:]] == [b"2"]  # the original, then one retry
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0


async def test_a_handler_publish_whose_reply_was_lost_ends_every_job_once(
    deps: Deps, settings: Settings, proxy
):
    """(d) A handler's XADD of a follow-up job ran, its reply was lost. The handler sees a
    dropped connection (the engine's Redis client does not re-send by itself): a retryable
    error, so its attempt is recorded `retrying` and attempt 2 runs and publishes again.
    The follow-up is published twice (at-least-once, as any producer's retry after a lost
    reply) and runs once per entry. The publishing job still ends once, in one state; the
    follow-up's entries end in one row per id and creation time, all `completed`."""
    job_id = await publisher(deps).publish(Q, Step(follow_up=True))
    next_id = f"{job_id}-next"
    cut = proxy.arm(b"XADD", arg=next_id.encode())
    async with worker_via(proxy, settings):
        await lost(cut)
        await eventually(lambda: settled(deps, [job_id, next_id]), timeout_s=15)

        async def both_follow_ups_over() -> bool:
            return bool(await recorded_runs(deps, [next_id]) == {next_id: [(1, "completed")] * 2})

        await eventually(both_follow_ups_over, timeout_s=15)
    entries = await deps.redis.xrange(deps.keys.stream(Q))
    published = [(f[b"id"].decode(), f.get(b"attempt", b"1")) for _, f in entries]
    # The job, its follow-up (reply lost), its retry, the follow-up again.
    assert published == [(job_id, b"1"), (next_id, b"1"), (job_id, b"2"), (next_id, b"1")]
    await assert_ends_once(deps, {job_id: "completed"})
    assert runs(deps, [job_id, next_id]) == {job_id: 2, next_id: 2}
    assert await recorded_runs(deps, [job_id]) == {job_id: [(1, "retrying"), (2, "completed")]}
    # The same id published twice is two entries (README, "An id is not a lock"): `jobs`
    # keeps one row per id and creation time (its entry's time), and one hash per id.
    rows = await deps.pool.fetch(
        "SELECT status, extract(epoch FROM created_at)::float8 AS created FROM jobs WHERE id = $1",
        next_id,
    )
    times = {entry_seconds(e) for e, f in entries if f[b"id"] == next_id.encode()}
    assert sorted(r["created"] for r in rows) == sorted(times)
    assert {r["status"] for r in rows} == {"completed"}
    assert await deps.redis.hget(deps.keys.job(next_id), "status") == b"completed"


async def test_a_lost_promotion_reply_moves_no_entry_twice(deps: Deps, settings: Settings, proxy):
    """(e) The promotion script moved a due delayed job to the stream; its reply was lost.
    Run again, it finds nothing due: one entry, one execution."""
    cut = proxy.arm(b"EVALSHA", arg=PROMOTE_SHA, reply_has=b":1\r\n")  # the run that moved it
    async with worker_via(proxy, settings):
        job_id = await publisher(deps).publish(Q, Step(), delay_s=0.3)
        await lost(cut)
        await eventually(lambda: settled(deps, [job_id]), timeout_s=15)
        await asyncio.sleep(0.5)  # a second promotion, if any, would have run by now
    await assert_ends_once(deps, {job_id: "completed"})
    assert runs(deps, [job_id]) == {job_id: 1}
    assert await recorded_runs(deps, [job_id]) == {job_id: [(1, "completed")]}
    assert await deps.redis.xlen(deps.keys.stream(Q)) == 1
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0


async def test_a_settlement_sent_again_for_want_of_replicas_is_no_stale_attempt(
    deps: Deps, settings: Settings
):
    """With `JOBSTREAM_PUBLISH_WAIT_REPLICAS=1` on a server without replicas, every
    settlement is unconfirmed and sent again a second later: the second finds its entries
    acked by the first, which is no attempt taken over."""
    s = msgspec.structs.replace(settings, publish_wait_replicas=1, publish_wait_timeout_ms=20)
    ids = await publisher(deps).publish_many(Q, [Step() for _ in range(5)])
    async with (
        connect(s) as wdeps,
        running(make_engine(wdeps, None, None, handlers=(step,))) as engine,
    ):
        await eventually(lambda: settled(deps, ids), timeout_s=15)
    assert engine.recorder.stale == 0
    await assert_ends_once(deps, dict.fromkeys(ids, "completed"))
    assert runs(deps, ids) == dict.fromkeys(ids, 1)

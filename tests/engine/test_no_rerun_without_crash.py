"""No re-run without a crash (inv. 10): dropped connections, retried reads, redeliveries and
drains never run an entry twice in one worker, and what a worker takes over it runs within
its limits."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Job, Policy, Publisher
from tests import handlers
from tests.helpers import (
    all_terminal,
    entry_seconds,
    eventually,
    executions,
    running,
    statuses,
)
from tests.servers import OwnRedis

Q = handlers.QUEUE

RUNS_Q = "test-runs"

RUNS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS test_runs (
    job_id text NOT NULL, entry_id text NOT NULL, attempt int NOT NULL, at timestamptz DEFAULT now()
)
"""


@handler(RUNS_Q, handlers.Work, Policy(max_attempts=3, timeout_s=20, concurrency=16))
async def counted(w: handlers.Work, job: Job, deps: Deps) -> None:
    """Count this execution in PostgreSQL (out of reach of Redis connection kills)."""
    await deps.pool.execute(
        "INSERT INTO test_runs (job_id, entry_id, attempt) VALUES ($1, $2, $3)",
        job.id,
        job.entry_id,
        job.attempt,
    )
    if w.sleep_s:
        await asyncio.sleep(w.sleep_s)


async def runs(deps: Deps) -> dict[str, int]:
    rows = await deps.pool.fetch("SELECT job_id, count(*) AS n FROM test_runs GROUP BY job_id")
    return {r["job_id"]: int(r["n"]) for r in rows}


async def kill_clients(url: str, stop: asyncio.Event, for_s: float) -> int:
    """Drop every normal client's connection again and again for `for_s` seconds (or until
    `stop`); return how often."""
    killer: Any = aioredis.Redis.from_url(url)
    kills = 0
    deadline = asyncio.get_running_loop().time() + for_s
    try:
        while not stop.is_set() and asyncio.get_running_loop().time() < deadline:
            await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            kills += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), random.uniform(0.02, 0.1))
    finally:
        await killer.aclose()
    return kills


async def test_killed_connections_never_run_an_entry_twice(own_redis: OwnRedis, settings: Settings):
    s = msgspec.structs.replace(settings, redis_url=own_redis.url)
    async with connect(s) as deps:
        await deps.pool.execute(RUNS_TABLE_SQL)
        pub = Publisher(deps.redis, deps.keys, {RUNS_Q: handlers.Work}, record_queued=False)
        ids = await pub.publish_many(RUNS_Q, [handlers.Work(sleep_s=0.002) for _ in range(1000)])
        eng = make_engine(deps, None, None, handlers=(counted,))
        stop = asyncio.Event()
        async with running(eng):
            killer = asyncio.create_task(kill_clients(own_redis.url, stop, 4.0))

            async def all_ran() -> bool:
                return len(await runs(deps)) == len(ids)

            try:
                await eventually(all_ran, timeout_s=30)
            finally:
                stop.set()
                kills = await killer

            async def none_pending() -> bool:
                summary = await deps.redis.xpending(deps.keys.stream(RUNS_Q), "workers")
                return bool(summary["pending"] == 0)

            await eventually(none_pending, timeout_s=20)
        assert kills >= 10
        counted_runs = await runs(deps)
        twice = {k: v for k, v in counted_runs.items() if v != 1}
        assert not twice, f"{len(twice)} jobs ran more than once after {kills} kills"
        rows = await deps.pool.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        assert {r["status"]: r["n"] for r in rows} == {"completed": len(ids)}


async def spawn_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.handlers", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def stop_worker(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out


async def test_a_draining_worker_keeps_its_jobs_until_it_exits(deps: Deps, env_for):
    """SIGTERM stops reading, not proving the worker is alive: nobody takes its long job."""
    job_id = await Publisher(deps.redis, deps.keys, handlers.PAYLOADS).publish(
        Q, handlers.Work(sleep_s=6)
    )
    holder = await spawn_worker(
        env_for(JOBSTREAM_CONSUMER_NAME="holder", JOBSTREAM_SHUTDOWN_GRACE_S="20")
    )
    other = None
    try:
        await eventually(lambda: executions(deps), timeout_s=30)
        other = await spawn_worker(env_for(JOBSTREAM_CONSUMER_NAME="other"))
        await eventually(lambda: deps.redis.exists(deps.keys.alive("other")), timeout_s=30)
        holder.send_signal(signal.SIGTERM)
        out = await stop_worker(holder)
        assert holder.returncode == 0, out.decode()
        assert b"draining 1 in-flight jobs" in out
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        other_out = await stop_worker(other) if other is not None else b""
    assert await executions(deps) == {job_id: 1}
    rows = await deps.pool.fetch("SELECT worker_id FROM job_executions WHERE job_id = $1", job_id)
    assert [r["worker_id"] for r in rows] == ["holder"]
    assert (await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id))[
        "status"
    ] == "completed"
    assert b"reclaimed" not in other_out


CONC_Q = "test-concurrency"
_in_flight: dict[str, list[int]] = {}  # key prefix -> [running now, most at once]


@handler(CONC_Q, handlers.Work, Policy(max_attempts=3, timeout_s=20, concurrency=2))
async def measured(w: handlers.Work, job: Job, deps: Deps) -> None:
    """Note how many of this test's jobs run at once."""
    count = _in_flight.setdefault(deps.keys.prefix, [0, 0])
    count[0] += 1
    count[1] = max(count[1], count[0])
    try:
        await asyncio.sleep(w.sleep_s)
    finally:
        count[0] -= 1


@pytest.mark.parametrize("holder", ["stable-1", "crashed-1"])
async def test_resumed_and_reclaimed_entries_respect_the_concurrency(deps: Deps, holder: str):
    """40 entries a consumer left pending: resumed under the same name (it looks alive) or
    reclaimed from a dead consumer, they still run at most `concurrency` (2) at once."""
    stream = deps.keys.stream(CONC_Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    pub = Publisher(deps.redis, deps.keys, {CONC_Q: handlers.Work}, record_queued=False)
    ids = await pub.publish_many(CONC_Q, [handlers.Work(sleep_s=0.05) for _ in range(40)])
    await deps.redis.xreadgroup("workers", holder, {stream: ">"})  # then it crashed
    if holder == "stable-1":
        await deps.redis.set(deps.keys.alive(holder), "1", px=60_000)
    consumer = "stable-1" if holder == "stable-1" else None
    eng = make_engine(deps, None, None, handlers=(measured,), consumer=consumer)
    async with running(eng):

        async def all_done() -> bool:
            rows = await deps.pool.fetchval(
                "SELECT count(*) FROM jobs WHERE status = 'completed' AND id = ANY($1)", ids
            )
            return bool(rows == len(ids))

        await eventually(all_done, timeout_s=20)
    assert _in_flight[deps.keys.prefix][1] <= 2


async def test_a_job_that_crashes_its_worker_is_dead_lettered_alone(deps: Deps, env_for):
    """A poison job kills every worker that runs it; the healthy jobs read or claimed with
    it still complete, and only it is dead-lettered once past max_deliveries (3)."""
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    healthy = await pub.publish_many(Q, [handlers.Work(sleep_s=0.5) for _ in range(3)])
    poison = await pub.publish(Q, handlers.Work(crash=True))
    healthy += await pub.publish_many(Q, [handlers.Work(sleep_s=0.5) for _ in range(3)])
    env = env_for(
        JOBSTREAM_MAX_DELIVERIES="3",
        JOBSTREAM_ALIVE_TTL_MS="500",
        JOBSTREAM_RECLAIM_INTERVAL_S="0.2",
        JOBSTREAM_LOG_LEVEL="WARNING",
    )
    ids = [*healthy, poison]
    deaths = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    while loop.time() < deadline:
        proc = await spawn_worker(env)  # restarted after each death, like a supervisor would
        while proc.returncode is None and not await all_terminal(deps, ids):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.1)
        if proc.returncode is None:
            await stop_worker(proc)
            break
        assert proc.returncode == -signal.SIGKILL
        deaths += 1
    got = await statuses(deps, ids)
    assert got == {**dict.fromkeys(healthy, "completed"), poison: "failed"}, f"{deaths} deaths"
    letters = await deps.redis.xrange(deps.keys.dead(Q))
    assert [f[b"job_id"].decode() for _, f in letters] == [poison]
    assert letters[0][1][b"reason"] == b"deliveries"
    assert deaths == 3  # one per allowed delivery, none more


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_a_redelivered_job_already_terminal_is_acked_without_running(deps: Deps, status: str):
    """inv. 3 and its twin: a job PostgreSQL shows completed or failed (dead-lettered) is
    over; a redelivery of its entry is acked and nothing else happens."""
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    eid = await deps.redis.xadd(stream, {"id": "done-1", "payload": "{}"})
    await deps.pool.execute(  # the row of the job's creation time: its entry's
        "INSERT INTO jobs (id, queue, status, error, attempts, created_at) "
        "VALUES ('done-1', $1, $2, $3, 1, to_timestamp($4::float8))",
        Q,
        status,
        "refused for good" if status == "failed" else None,
        entry_seconds(eid),
    )
    await deps.redis.xreadgroup("workers", "ghost", {stream: ">"})  # then it died
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def acked() -> bool:
            return bool((await deps.redis.xpending(stream, "workers"))["pending"] == 0)

        await eventually(acked)
    assert await executions(deps) == {}
    row = await deps.pool.fetchrow("SELECT status, attempts FROM jobs WHERE id = 'done-1'")
    assert (row["status"], row["attempts"]) == (status, 1)
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0


async def test_killed_connections_never_send_a_message_twice(
    own_redis: OwnRedis, settings: Settings
):
    """The same faults on `email-sending` against a real SMTP sink: each message reaches
    the sink once (the issue's case: two of eight went out twice)."""
    from collections import Counter

    from jobstream.consumers.demo.smtp_sink import smtp_sink
    from jobstream.consumers.store.mailboxes import add_mailbox
    from jobstream.schema.payloads import SendEmail

    s = msgspec.structs.replace(settings, redis_url=own_redis.url)
    async with connect(s) as deps, smtp_sink() as sink:
        await add_mailbox(
            deps.pool, "sender@example.com", mailbox_id="mb-s", smtp_url=sink.url(),
            daily_limit=10_000, per_minute_limit=10_000,
        )  # fmt: skip
        sends = [
            SendEmail(mailbox_id="mb-s", to=[f"r{i}@example.net"], subject=f"s{i}", text="t")
            for i in range(60)
        ]
        ids = await deps.publisher.publish_many("email-sending", sends)
        stop = asyncio.Event()
        async with running(make_engine(deps, ["email-sending"], None)):
            killer = asyncio.create_task(kill_clients(own_redis.url, stop, 4.0))
            try:
                await eventually(lambda: all_terminal(deps, ids), timeout_s=60)
            finally:
                stop.set()
                kills = await killer
        assert kills >= 10
        assert set((await statuses(deps, ids)).values()) == {"completed"}
        delivered = Counter(m.parsed()["Message-ID"] for m in sink.messages)
        assert len(delivered) == len(ids)
        assert set(delivered.values()) == {1}, f"sent twice after {kills} kills"

"""Faults found by trying the project as a user would: each one reproduced, then held."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from consumers.deps import Deps
from consumers.runtime import make_engine
from streams import Policy, Publisher, PublishError
from streams.dispatch import classify
from streams.job import Outcome
from tests import handlers
from tests.conftest import eventually, running
from tests.helpers import jobstream
from tests.servers import free_port
from tests.test_engine import all_terminal, engine, executions, statuses

Q = handlers.QUEUE


def pub(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, handlers.PAYLOADS)


async def test_a_retry_that_cannot_be_written_is_not_acked_and_is_written_later(deps: Deps):
    """inv. 1: the delayed set refuses the retry; the entry stays pending until it is written."""
    delayed = deps.keys.delayed(Q)
    await deps.redis.set(delayed, "not a sorted set")  # ZADD now fails with WRONGTYPE
    job_id = await pub(deps).publish(Q, handlers.Work(fail_times=1))
    stream = deps.keys.stream(Q)
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


async def test_stop_before_redis_ever_answered_returns_promptly(deps: Deps):
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    eng = make_engine(deps, None, None, extra=handlers.SPECS)
    eng.redis = dead
    eng.recorder._redis = dead
    task = asyncio.create_task(eng.run())
    await asyncio.sleep(0.5)
    eng.stop()
    await asyncio.wait_for(task, 10)
    await dead.aclose()


async def test_burst_drains_what_is_ready_and_leaves_later_jobs(deps: Deps, env_for):
    p = pub(deps)
    later = await p.publish(Q, handlers.Work(), delay_s=3600)
    now = await p.publish_many(Q, [handlers.Work() for _ in range(3)])
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.handlers", "--burst", env=env_for(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert time.monotonic() - started < 30
    assert set((await statuses(deps, now)).values()) == {"completed"}
    assert later not in await statuses(deps, [later])
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 1


async def test_commands_fail_fast_in_one_line_when_a_server_is_down(deps: Deps, env_for):
    closed = free_port()
    no_pg = await jobstream(
        env_for(DATABASE_URL=f"postgresql://app:s3cret@127.0.0.1:{closed}/x"), "status", limit_s=30
    )
    assert no_pg.returncode == 2
    assert "PostgreSQL at postgresql://app:***@127.0.0.1" in no_pg.stderr
    assert "s3cret" not in no_pg.stderr + no_pg.stdout
    assert no_pg.stderr.count("\n") == 1
    no_redis = await jobstream(env_for(REDIS_URL=f"redis://127.0.0.1:{closed}/0"), "status")
    assert no_redis.returncode == 1
    assert "Traceback" not in no_redis.stderr
    assert no_redis.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"JOBSTREAM_BLOCK_MS": "-1"}, ["status"], "JOBSTREAM_BLOCK_MS"),
        ({"JOBSTREAM_LOG_LEVEL": "LOUD"}, ["status"], "JOBSTREAM_LOG_LEVEL"),
        ({"REDIS_URL": "http://x"}, ["status"], "redis://, rediss:// or unix://"),
        ({}, ["worker", "--concurrency", "0"], "at least 1"),
        ({}, ["publish", "analytics", "{}", "--delay", "nan"], "delay of nan"),
        ({}, ["dlq", "show", "garbage"], "invalid dead-letter id"),
        ({}, ["dlq", "list", "nope"], "unknown queue 'nope'"),
    ],
)
async def test_bad_input_on_the_command_line_is_one_clear_line(
    deps: Deps, env_for, env: dict[str, str], args: list[str], expected: str
):
    out = await jobstream(env_for(**env), *args, limit_s=30)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


async def test_publish_refuses_impossible_delays(deps: Deps):
    for delay in (float("nan"), float("inf"), -1.0):
        with pytest.raises(PublishError, match="delay of"):
            await pub(deps).publish(Q, handlers.Work(), delay_s=delay)


def test_a_payload_postgres_refuses_is_a_permanent_failure():
    policy = Policy(max_attempts=10)
    exc = asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape")
    assert classify(exc, 1, policy) == (Outcome.FAILED, "permanent")
    assert classify(TimeoutError(), 1, policy)[0] is Outcome.RETRYING


async def test_entries_deleted_before_a_restart_are_acked_not_dead_lettered(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = await pub(deps).publish_many(Q, [handlers.Work() for _ in range(2)])
    entries: Any = await deps.redis.xreadgroup("workers", "stable-2", {stream: ">"})
    await deps.redis.xdel(stream, entries[0][1][0][0])  # trimmed away before it ran
    async with running(engine(dataclasses_replace(deps, consumer_name="stable-2"))):
        await eventually(lambda: all_terminal(deps, ids[1:]))

        async def none_pending():
            return (await deps.redis.xpending(stream, "workers"))["pending"] == 0

        await eventually(none_pending)
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0


async def test_a_consumer_holding_entries_is_never_removed_from_the_group(deps: Deps):
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await deps.redis.xadd(stream, {"payload": "{}"})
    await deps.redis.xreadgroup("workers", "holder", {stream: ">"})
    await deps.redis.xreadgroup("workers", "empty", {stream: ">"})
    rc = engine(deps).reclaimer
    assert await rc._delconsumer(keys=[stream], args=["workers", "holder"]) == 0
    assert await rc._delconsumer(keys=[stream], args=["workers", "empty"]) == 1
    names = [c["name"] for c in await deps.redis.xinfo_consumers(stream, "workers")]
    assert names == [b"holder"]


def dataclasses_replace(deps: Deps, **settings: Any) -> Deps:
    import dataclasses

    return dataclasses.replace(deps, settings=msgspec.structs.replace(deps.settings, **settings))

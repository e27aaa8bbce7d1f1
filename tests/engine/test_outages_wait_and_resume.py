"""Redis or PostgreSQL goes away while jobs flow: the worker waits, acks nothing unrecorded,
resumes by itself, and every job ends in exactly one terminal state (inv. 7)."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
import redis.asyncio as aioredis

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Publisher
from tests import handlers
from tests.helpers import all_terminal, eventually, executions, running, statuses
from tests.servers import OwnPostgres, OwnRedis, free_port

Q = handlers.QUEUE


def pub(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, handlers.PAYLOADS)


async def test_postgres_stopped_and_restarted_while_jobs_flow(
    own_pg: OwnPostgres, settings: Settings, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    s = msgspec.structs.replace(settings, database_url=own_pg.url)
    async with connect(s) as deps:
        stream = deps.keys.stream(Q)
        first = await pub(deps).publish_many(Q, [handlers.Work(sleep_s=0.05) for _ in range(200)])
        eng = make_engine(deps, None, 8, handlers=handlers.SPECS)
        async with running(eng):
            await eventually(lambda: executions(deps))
            await asyncio.to_thread(own_pg.stop)
            # Jobs published during the outage still run, but nothing is acked unrecorded.
            second = await pub(deps).publish_many(Q, [handlers.Work() for _ in range(50)])

            async def handlers_ran_on():
                return set(second) <= set(await executions(deps))

            await eventually(handlers_ran_on, timeout_s=60)
            await asyncio.sleep(1.0)  # several failed flushes
            pending = (await deps.redis.xpending(stream, "workers"))["pending"]
            acked_during_outage = (await deps.redis.xlen(stream)) - pending
            assert pending >= len(second)  # they ran, but nothing unrecorded was acked
            await asyncio.to_thread(own_pg.start)
            ids = [*first, *second]
            await eventually(lambda: all_terminal(deps, ids), timeout_s=60)
            # Everything acked before the outage was committed: no row is missing.
            assert acked_during_outage <= len(await statuses(deps, ids))

            async def none_pending():
                return (await deps.redis.xpending(stream, "workers"))["pending"] == 0

            await eventually(none_pending)
        assert set((await statuses(deps, ids)).values()) == {"completed"}
        rows = await deps.pool.fetchval("SELECT count(*) FROM jobs")
        assert rows == len(ids)
    recorder = [r for r in caplog.records if r.name == "jobstream.streams.recorder"]
    outage_lines = [r for r in recorder if "PostgreSQL unavailable" in r.getMessage()]
    assert len(outage_lines) == 1  # logged once, not once per retry
    assert any("PostgreSQL is back" in r.getMessage() for r in caplog.records)


async def test_redis_stopped_and_restarted_while_jobs_flow(
    own_redis: OwnRedis, settings: Settings, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    s = msgspec.structs.replace(settings, redis_url=own_redis.url)
    async with connect(s) as deps:
        ids = await pub(deps).publish_many(Q, [handlers.Work(sleep_s=0.02) for _ in range(400)])
        eng = make_engine(deps, None, 8, handlers=handlers.SPECS)
        async with running(eng):

            async def some_done():
                return len([v for v in (await statuses(deps, ids)).values() if v == "completed"])

            await eventually(some_done)
            await own_redis.stop()
            await asyncio.sleep(1.5)
            await own_redis.start()
            await eventually(lambda: all_terminal(deps, ids), timeout_s=60)

            async def none_pending():
                return (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0

            await eventually(none_pending, timeout_s=30)
        assert set((await statuses(deps, ids)).values()) == {"completed"}
        counts = await executions(deps)
        # The execution counter lives in the restarted Redis too: at least one run per job.
        assert set(counts) == set(ids)
    messages = [r.getMessage() for r in caplog.records]
    assert any("Redis unavailable" in m or "unavailable" in m for m in messages)
    assert any("is back" in m for m in messages)


async def test_stop_before_redis_ever_answered_returns_promptly(deps: Deps):
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    eng = make_engine(deps, None, None, handlers=handlers.SPECS)
    eng.redis = dead
    eng.recorder._redis = dead
    task = asyncio.create_task(eng.run())
    await asyncio.sleep(0.5)
    eng.stop()
    await asyncio.wait_for(task, 10)
    await dead.aclose()

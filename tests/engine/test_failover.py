"""Redis Cluster failover: a master SIGKILLed mid-flow loses no job the producer saw confirmed
(with `JOBSTREAM_PUBLISH_WAIT_REPLICAS`), and the workers find the new master by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import tempfile
from collections.abc import AsyncIterator

import pytest

from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.streams import Keys, Publisher, PublishError
from jobstream.streams.redis_client import REDIS_ERRORS, connect_redis
from tests import handlers
from tests.cluster_servers import OwnCluster
from tests.helpers import eventually, quick_settings, running
from tests.servers import OwnRedis

Q = handlers.QUEUE
_REFUSED: tuple[type[BaseException], ...] = (PublishError, *REDIS_ERRORS)


@pytest.fixture
async def own_cluster() -> AsyncIterator[OwnCluster]:
    """A cluster of its own: this test kills one of its masters."""
    with tempfile.TemporaryDirectory(prefix="jobstream-failover-") as folder:
        cluster = OwnCluster(pathlib.Path(folder))
        try:
            await asyncio.to_thread(cluster.start)
            yield cluster
        finally:
            await asyncio.to_thread(cluster.stop)


async def produce(
    pub: Publisher, confirmed: list[str], refused: list[str], stop: asyncio.Event
) -> None:
    """Publish batches until `stop`; keep the ids of the batches confirmed and refused."""
    n = 0
    while not stop.is_set():
        ids = [f"fo-{n + i}" for i in range(10)]
        n += 10
        try:
            await pub.publish_many(Q, [handlers.Work(sleep_s=0.01)] * 10, ids)
            confirmed += ids
        except _REFUSED:  # not confirmed: may run or be lost
            refused += ids
            await asyncio.sleep(0.1)


async def test_master_killed_mid_flow_loses_nothing_confirmed(
    own_cluster: OwnCluster, database: str, prefix: str, capsys: pytest.CaptureFixture[str]
):
    settings = quick_settings(
        own_cluster.url,
        True,
        database,
        prefix,
        publish_wait_replicas=1,
        publish_wait_timeout_ms=2000,
    )
    confirmed: list[str] = []
    refused: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        # Two workers, each with its own cluster client, and a producer with a third.
        deps = await stack.enter_async_context(connect(settings))
        pub = Publisher(
            deps.redis, deps.keys, handlers.PAYLOADS, wait_replicas=1, wait_timeout_ms=2000
        )
        for i in range(2):
            w = await stack.enter_async_context(connect(settings, client_name=f"w{i}"))
            await stack.enter_async_context(
                running(make_engine(w, None, None, handlers=handlers.SPECS, consumer=f"w{i}"))
            )
        stop = asyncio.Event()
        producer = asyncio.create_task(produce(pub, confirmed, refused, stop))

        async def flowing() -> bool:
            done = await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status='completed'")
            return int(done) >= 200

        await eventually(flowing, timeout_s=60)
        victim = await asyncio.to_thread(own_cluster.master_of, deps.keys.stream(Q))
        await asyncio.to_thread(own_cluster.kill, victim)  # the stream's master, mid-flow
        before = len(confirmed)
        await asyncio.to_thread(own_cluster.wait_ok)  # its replica took over
        successor = await asyncio.to_thread(own_cluster.master_of, deps.keys.stream(Q))
        assert successor != victim
        # Until the node is back (as the new master's replica), nothing on that master can
        # be confirmed by a replica: the producer is refused, as it must be.
        await asyncio.to_thread(own_cluster.restart, victim)
        await asyncio.to_thread(own_cluster.wait_ok)
        assert (await asyncio.to_thread(own_cluster.roles))[victim] == "slave"

        async def published_after() -> bool:
            return len(confirmed) >= before + 300

        await eventually(published_after, timeout_s=60)  # the producer found the new master
        stop.set()
        await producer

        async def all_done() -> bool:
            rows = await deps.pool.fetch(
                "SELECT id, status FROM jobs WHERE id = ANY($1)", confirmed
            )
            return sum(r["status"] in ("completed", "failed") for r in rows) == len(confirmed)

        await eventually(all_done, timeout_s=90, interval_s=0.3)
        rows = await deps.pool.fetch("SELECT id, status FROM jobs WHERE id = ANY($1)", confirmed)
        assert {r["id"]: r["status"] for r in rows} == dict.fromkeys(confirmed, "completed")

        async def views_agree() -> bool:
            for job_id in confirmed:
                if await deps.redis.hget(deps.keys.job(job_id), "status") != b"completed":
                    return False
            return True

        await eventually(views_agree, timeout_s=30, interval_s=0.5)
        # Nothing left behind: no entry pending, no retry waiting.
        summary = await deps.redis.xpending(deps.keys.stream(Q), settings.group)
        assert summary["pending"] == 0
    assert len(confirmed) >= 500, (len(confirmed), len(refused))
    with capsys.disabled():
        print(  # noqa: T201
            f"\nfailover: {len(confirmed)} jobs confirmed, all completed once; "
            f"{len(refused)} refused while the stream's master had no replica"
        )


async def test_publish_fails_when_fewer_replicas_confirm(own_redis: OwnRedis, prefix: str):
    r = connect_redis(own_redis.url)  # a master without replicas
    keys = Keys(f"{prefix}jobs:", f"{prefix}job:")
    try:
        waiting = Publisher(r, keys, handlers.PAYLOADS, wait_replicas=1, wait_timeout_ms=50)
        with pytest.raises(PublishError, match="confirmed by 0 of 1 replicas within 50 ms"):
            await waiting.publish(Q, handlers.Work(), "unconfirmed")
        # Written all the same (it may run): publishing again is what the error asks.
        assert await r.xlen(keys.stream(Q)) == 1
        plain = Publisher(r, keys, handlers.PAYLOADS)
        assert await plain.publish(Q, handlers.Work(), "unwaited") == "unwaited"
    finally:
        await r.aclose()

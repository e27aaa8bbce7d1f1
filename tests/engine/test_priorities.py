"""Priority levels against the real Redis and PostgreSQL: one stream per level in the queue's
slot (the default level keeps the queue's own key), a weighted order that lets a low level
progress under a saturated high one, and reclaim, retries, dead letters, cancel and status
over every level (DESIGN.md 1, 4, 5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from jobstream.consumers.cli import ops
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import ConfigError, Job, PermanentError, Policy, Publisher, PublishError
from jobstream.streams.cancel import Cancelled, cancel_job
from jobstream.streams.keys import Keys, base_queue, check_queue_name, level_queue
from jobstream.streams.levels import WeightedOrder, level_names
from tests.helpers import eventually, running

PQ = "test-prio"
POLICY = Policy(
    max_attempts=2,
    backoff_base_s=0.05,
    backoff_cap_s=0.1,
    concurrency=1,
    priorities=("high", "normal", "low"),
    priority_weights=(3, 2, 1),
)


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    fail_once: bool = False
    permanent: bool = False


def order_key(deps: Deps) -> str:
    return f"{deps.keys.prefix}order"


@handler(PQ, Tick, POLICY)
async def tick(t: Tick, job: Job, deps: Deps) -> dict[str, Any]:
    """Note the order in which jobs start (in Redis); fail as asked."""
    await deps.redis.rpush(order_key(deps), t.tag)
    if t.permanent:
        raise PermanentError("refused")
    if t.fail_once and job.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"queue": job.queue}


def publisher(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**PAYLOADS, PQ: Tick}, priorities={PQ: POLICY})


def engine(deps: Deps, **kw: Any):
    return make_engine(deps, handlers=[*HANDLERS, tick], **kw)


async def status_of(deps: Deps, job_id: str) -> str | None:
    status: str | None = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    return status


async def test_each_level_is_a_stream_of_the_queue_slot_and_the_default_keeps_the_key(
    deps: Deps,
):
    pub = publisher(deps)
    await pub.publish(PQ, Tick(tag="h"), "h1", priority="high")
    await pub.publish(PQ, Tick(tag="n"), "n1")  # no priority: the default level
    await pub.publish(PQ, Tick(tag="n"), "n2", priority="normal")
    await pub.publish(PQ, Tick(tag="l"), "l1", priority="low")
    prefix = deps.keys.prefix
    assert await deps.redis.xlen(f"{prefix}{{{PQ}}}:high") == 1
    assert await deps.redis.xlen(f"{prefix}{{{PQ}}}") == 2
    assert await deps.redis.xlen(f"{prefix}{{{PQ}}}:low") == 1
    with pytest.raises(PublishError, match="test-prio has no priority 'urgent'"):
        await pub.publish(PQ, Tick(tag="x"), "x", priority="urgent")
    with pytest.raises(PublishError, match="analytics has no priority levels"):
        await pub.publish("analytics", {}, "y", priority="high")
    assert level_names(PQ, POLICY) == [f"{PQ}\x1fhigh", PQ, f"{PQ}\x1flow"]
    with pytest.raises(ConfigError, match="none of cancels, dead"):
        Policy(priorities=("high", "dead"))
    with pytest.raises(ConfigError, match="one whole number of at least 1 per level"):
        Policy(priorities=("a", "b"), priority_weights=(1,))
    with pytest.raises(ConfigError, match="priorities or partitions > 1, not both"):
        Policy(priorities=("high", "low"), partitions=2)
    assert Policy(priorities=("high", "low"), partitions=1).levels()[0] == ("high", 2)
    assert Policy(partitions=4).partitions == 4
    async with running(engine(deps)):

        async def done() -> bool:
            n = await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")
            return bool(n == 4)

        await eventually(done)
    queues = await deps.pool.fetch("SELECT DISTINCT queue FROM jobs")
    assert [r["queue"] for r in queues] == [PQ]  # the queue, whatever the level
    result = await deps.pool.fetchval("SELECT result::text FROM jobs WHERE id = 'h1'")
    assert msgspec.json.decode(result) == {"queue": PQ}


def test_key_helpers_strip_a_level_and_a_partition_alike():
    keys = Keys()
    for name in ("q\x1fhigh", "q#3", "q"):
        assert base_queue(name) == "q"
        assert keys.cancels(name) == "jobs:{q}:cancels"
        assert keys.unique(name, "j") == "jobs:{q}:unique:j"
        assert keys.schedule(name, "s") == "jobs:{q}:schedule:s"
    assert keys.stream("q#3") == "jobs:{q#3}"  # a partition keeps its own slot's keys
    assert keys.dead("q#3") == "jobs:{q#3}:dead"
    assert keys.stream("q\x1fhigh") == "jobs:{q}:high"  # a level stays in the queue's slot
    assert keys.dead("q\x1fhigh") == "jobs:{q}:dead"
    with pytest.raises(ConfigError):
        check_queue_name("q#1")


def test_weighted_order_spreads_slots_by_weight():
    order = WeightedOrder([3, 2, 1])
    one_at_a_time = [order.take(1).index(1) for _ in range(12)]
    assert one_at_a_time == [0, 1, 0, 2, 1, 0] * 2
    assert WeightedOrder([3, 2, 1]).take(60) == [30, 20, 10]


async def test_a_saturated_high_level_leaves_low_its_share(deps: Deps):
    """One slot; 90 high and 30 low jobs wait, normal is empty. Weights 3, 2, 1: normal's
    share goes to high, so one start in six is low's until low runs out: high first,
    low never starved."""
    pub = publisher(deps)
    for i in range(90):
        await pub.publish(PQ, Tick(tag="high"), f"h{i}", priority="high")
    for i in range(30):
        await pub.publish(PQ, Tick(tag="low"), f"l{i}", priority="low")
    async with running(engine(deps)):

        async def started() -> bool:
            return bool(await deps.redis.llen(order_key(deps)) >= 120)

        await eventually(started, timeout_s=60)
    order = [x.decode() for x in await deps.redis.lrange(order_key(deps), 0, -1)]
    first = order[:60]
    assert 8 <= first.count("low") <= 12, first  # 10 of 60 at weight 1 of 6
    assert first.count("high") >= 48
    assert "low" in order[:8]  # low progressed while high was saturated
    assert order.count("low") == 30
    assert order.count("high") == 90


async def test_reclaim_retries_dead_letters_cancel_and_status_cover_every_level(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
):
    pub = publisher(deps)
    high = deps.keys.stream(level_queue(PQ, "high"))
    # A consumer that read a high entry and died (no heartbeat): taken over.
    await deps.redis.xgroup_create(high, "workers", id="0", mkstream=True)
    await pub.publish(PQ, Tick(tag="orphan"), "orphan", priority="high")
    await deps.redis.xreadgroup("workers", "ghost", {high: ">"}, count=1)
    await pub.publish(PQ, Tick(tag="retry", fail_once=True), "retry", priority="high")
    await pub.publish(PQ, Tick(tag="dead", permanent=True), "dead", priority="low")
    await pub.publish(PQ, Tick(tag="cancel"), "cancel-me", priority="low")
    monkeypatch.setattr(ops, "by_queue", _with_tick)  # the test queue, registered
    answer = await cancel_job(
        deps.redis,
        deps.pool,
        deps.keys,
        "cancel-me",
        levels=ops.levels_of,
        hash_ttl_s=deps.settings.hash_ttl_s,
    )
    assert answer.outcome is Cancelled.CANCELLED
    status = {r["queue"]: r for r in await ops.queue_status(deps)}[PQ]
    assert status["length"] == 3  # the cancelled entry was deleted
    assert status["pending"] == 1  # the ghost's
    assert status["levels"] == {
        "high": {"length": 2, "pending": 1, "lag": 1, "delayed": 0},
        "normal": {"length": 0, "pending": 0, "lag": 0, "delayed": 0},
        "low": {"length": 1, "pending": 0, "lag": 0, "delayed": 0},
    }
    async with running(engine(dataclasses.replace(deps))):
        for job_id, want in (("orphan", "completed"), ("retry", "completed"), ("dead", "failed")):

            async def reached(job_id: str = job_id, want: str = want) -> bool:
                return await status_of(deps, job_id) == want

            await eventually(reached, timeout_s=20)
    assert await deps.pool.fetchval("SELECT attempts FROM jobs WHERE id = 'retry'") == 2
    retry_entry = await deps.pool.fetchval("SELECT stream_entry_id FROM jobs WHERE id = 'retry'")
    assert await deps.redis.xrange(high, retry_entry, retry_entry)  # retried in its level
    dead = await deps.redis.xrange(deps.keys.dead(PQ))
    assert [(f[b"job_id"], f[b"queue"]) for _, f in dead] == [(b"dead", PQ.encode())]
    assert await status_of(deps, "cancel-me") == "cancelled"
    order = [x.decode() for x in await deps.redis.lrange(order_key(deps), 0, -1)]
    assert "cancel" not in order
    done = {r["queue"]: r for r in await ops.queue_status(deps)}[PQ]
    assert done["pending"] == 0
    assert done["jobs"] == {"cancelled": 1, "completed": 2, "failed": 1}


def _with_tick() -> dict[str, Any]:
    from jobstream.consumers.worker.registry import by_queue

    return {**by_queue(), PQ: tick}

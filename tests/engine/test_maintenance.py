"""The maintenance loops (trim, promote, reclaim, heartbeat) outlive every fault, and no
input wedges them or the recorder (DESIGN.md inv. 4 and 8)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import Any

import msgspec
import pytest
import redis

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Job, Policy, Publisher, RetryableError
from jobstream.streams.trimmer import safe_min_id
from tests import handlers
from tests.helpers import (
    REDIS_URL,
    SLOW_Q,
    all_terminal,
    eventually,
    executions,
    running,
    slow,
    statuses,
    with_settings,
    work_publisher,
)
from tests.servers import OwnPostgres

Q = handlers.QUEUE


def engine(deps: Deps, **settings: Any) -> Any:
    if settings:
        deps = dataclasses.replace(
            deps, settings=msgspec.structs.replace(deps.settings, **settings)
        )
    return make_engine(deps, None, None, handlers=(*handlers.SPECS, slow, hinted))


async def test_trim_survives_the_pending_list_emptying_under_it(deps: Deps):
    """Between XINFO GROUPS (pending > 0) and XPENDING the last entry may be acked."""
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    stop = threading.Event()

    def churn() -> None:  # another worker: read one, ack it, over and over
        r = redis.Redis.from_url(REDIS_URL)
        try:
            while not stop.is_set():
                eid = r.xadd(stream, {"payload": "{}"})
                r.xreadgroup("workers", "busy", {stream: ">"}, count=1)
                r.xack(stream, "workers", eid)
        finally:
            r.close()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        calls = 0
        while time.monotonic() < deadline:
            low = await safe_min_id(deps.redis, stream)
            assert low is not None
            calls += 1
    finally:
        stop.set()
        thread.join()
    assert calls > 100


async def test_one_queue_s_broken_keys_do_not_stop_the_loops_of_the_others(
    deps: Deps, caplog: pytest.LogCaptureFixture
):
    """A delayed set that is not a sorted set fails that queue's promotion and nothing
    else, logged once; groups and consumers whose names are not UTF-8 (all made by hand)
    fail nothing."""
    await deps.redis.set(deps.keys.delayed(Q), "not a sorted set")
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, b"\xff\xfe", id="0", mkstream=True)
    await deps.redis.xgroup_create(stream, "workers", id="0")
    await deps.redis.xadd(stream, {"payload": "{}"})
    dead_name: Any = b"\xfe\xff"
    await deps.redis.xreadgroup("workers", dead_name, {stream: ">"})  # a dead consumer
    pub = Publisher(deps.redis, deps.keys, {SLOW_Q: handlers.Work, **handlers.PAYLOADS})
    later = await pub.publish(SLOW_Q, handlers.Work(), delay_s=0.3)
    now = await pub.publish(Q, handlers.Work())
    eng = engine(deps, trim_interval_s=0.1)
    async with running(eng):
        await eventually(lambda: all_terminal(deps, [later, now]))
        await asyncio.sleep(0.6)  # several more passes of every loop
        assert eng.health() is None
    refused = [r for r in caplog.records if "WRONGTYPE" in r.getMessage()]
    assert len(refused) == 1  # once, not once per pass
    assert not [r for r in caplog.records if "UnicodeDecodeError" in r.getMessage()]


async def test_a_huge_retry_or_delayed_member_never_blocks_the_delayed_set(deps: Deps):
    """An entry with 5,000 extra fields fails once: its retry still runs, and a delayed
    member that big (written by hand) is published with the fields that matter."""
    stream = deps.keys.stream(Q)
    extra: dict[Any, Any] = {f"x{i}": "y" for i in range(5000)}
    payload = msgspec.json.encode(handlers.Work(fail_times=1)).decode()
    await deps.redis.xadd(stream, {"id": "wide-retry", "payload": payload, **extra})
    member = msgspec.json.encode({"id": "wide-delayed", "payload": "{}", **extra})
    due = int(time.time() * 1000)
    await deps.redis.zadd(deps.keys.delayed(Q), {member: due})
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    behind = await pub.publish(Q, handlers.Work(), delay_s=0.2)
    ids = ["wide-retry", "wide-delayed", behind]
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert await executions(deps) == {"wide-retry": 2, "wide-delayed": 1, behind: 1}
    assert await deps.redis.zcard(deps.keys.delayed(Q)) == 0
    published: Any = await deps.redis.xrange(stream)
    retry, delayed = (
        next(f for _, f in published if f[b"id"] == job_id and f.get(b"attempt") == attempt)
        for job_id, attempt in ((b"wide-retry", b"2"), (b"wide-delayed", None))
    )
    # id, payload, attempt, created_ms, 100 others, dropped_fields
    assert len(retry) == 4 + 100 + 1
    assert retry[b"dropped_fields"] == b"4900"
    assert delayed == {b"id": b"wide-delayed", b"payload": b"{}", b"dropped_fields": b"5000"}


HINT_Q = "test-hint"


class Hint(msgspec.Struct, frozen=True):
    retry_after: str  # float() of it: "inf", "nan", "-5", ...


@handler(HINT_Q, Hint, Policy(max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1))
async def hinted(h: Hint, job: Job, deps: Deps) -> None:
    """Fail the first attempt with the retry-after hint the payload names."""
    if job.attempt == 1:
        raise RetryableError("try later", retry_after_s=float(h.retry_after))


async def test_no_retry_after_hint_wedges_the_recorder(deps: Deps):
    """inf, NaN and negative hints are bounded; every other outcome still settles."""
    pub = Publisher(deps.redis, deps.keys, {HINT_Q: Hint, **handlers.PAYLOADS})
    forever = await pub.publish(HINT_Q, Hint("inf"))
    odd = [await pub.publish(HINT_Q, Hint(h)) for h in ("nan", "-5", "1e308")]
    plain = await pub.publish_many(Q, [handlers.Work() for _ in range(20)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [*plain, odd[0], odd[1]]))

        async def deferred() -> Any:
            rows = await deps.pool.fetch(
                "SELECT status, next_attempt_at FROM jobs WHERE id = ANY($1)", [forever, odd[2]]
            )
            return len(rows) == 2 and all(r["status"] == "retrying" for r in rows) and rows

        rows = await eventually(deferred)
    in_a_day = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    for row in rows:
        assert in_a_day - dt.timedelta(hours=1) < row["next_attempt_at"] <= in_a_day
    assert await deps.redis.zcard(deps.keys.delayed(HINT_Q)) == 2


async def test_outcomes_waiting_for_postgres_are_never_taken_past_the_ceiling(
    own_pg: OwnPostgres, settings: Settings, prefix: str, caplog: pytest.LogCaptureFixture
):
    """Through an outage longer than the safety ceiling, a live worker keeps the entries
    whose outcomes wait in its recorder: no replica (itself included) runs them again."""
    caplog.set_level(logging.WARNING)
    s = msgspec.structs.replace(settings, database_url=own_pg.url, reclaim_ceiling_ms=3000)
    async with connect(s) as deps:
        a = make_engine(deps, None, None, handlers=handlers.SPECS, consumer="holder")
        b = make_engine(deps, None, None, handlers=handlers.SPECS, consumer="other")
        async with running(a), running(b):
            await asyncio.sleep(0.3)  # both started: b's pool is open
            await asyncio.to_thread(own_pg.stop)
            pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS, record_queued=False)
            ids = await pub.publish_many(Q, [handlers.Work() for _ in range(30)])

            async def all_ran() -> bool:
                return len(await executions(deps)) == len(ids)

            await eventually(all_ran)
            await asyncio.sleep(5)  # well past the 3 s ceiling, outcomes still unrecorded
            await asyncio.to_thread(own_pg.start)
            await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
        try:
            assert await executions(deps) == dict.fromkeys(ids, 1)
        finally:
            keys = [k async for k in deps.redis.scan_iter(match=f"{prefix}*")]
            await deps.redis.delete(*keys)
    assert not [r for r in caplog.records if "idle past the ceiling" in r.getMessage()]


async def test_entries_deleted_before_a_restart_are_acked_not_dead_lettered(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = await work_publisher(deps).publish_many(
        handlers.QUEUE, [handlers.Work() for _ in range(2)]
    )
    entries: Any = await deps.redis.xreadgroup("workers", "stable-2", {stream: ">"})
    await deps.redis.xdel(stream, entries[0][1][0][0])  # trimmed away before it ran
    async with running(engine(with_settings(deps, consumer_name="stable-2"))):
        await eventually(lambda: all_terminal(deps, ids[1:]))

        async def none_pending():
            return (await deps.redis.xpending(stream, "workers"))["pending"] == 0

        await eventually(none_pending)
    assert await deps.redis.xlen(deps.keys.dead(handlers.QUEUE)) == 0


async def test_a_consumer_holding_entries_is_never_removed_from_the_group(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await deps.redis.xadd(stream, {"payload": "{}"})
    await deps.redis.xreadgroup("workers", "holder", {stream: ">"})
    await deps.redis.xreadgroup("workers", "empty", {stream: ">"})
    rc = engine(deps).reclaimer
    assert await rc._delconsumer(keys=[stream], args=["workers", "holder"]) == 0
    assert await rc._delconsumer(keys=[stream], args=["workers", "empty"]) == 1
    names = [c["name"] for c in await deps.redis.xinfo_consumers(stream, "workers")]
    assert names == [b"holder"]

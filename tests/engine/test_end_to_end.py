"""The engine end to end: invalid entries, both stores, ack-after-commit, redelivery, sharing
(DESIGN.md inv. 1, 2, 3 and 5)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import Policy, Publisher, PublishError
from jobstream.streams.dispatch import classify
from jobstream.streams.status import Outcome
from tests import handlers
from tests.helpers import (
    all_terminal,
    engine,
    entry_seconds,
    event,
    eventually,
    executions,
    running,
    statuses,
)

Q = handlers.QUEUE
# Every test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


def publisher(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**PAYLOADS, **handlers.PAYLOADS})


INVALID = [
    ({"id": "no-payload", "foo": "bar"}, "field 'payload' is missing"),
    ({"id": "not-json", "payload": "{nope"}, "not JSON"),
    ({"id": "wrong-shape", "payload": '{"sleep_s": "slow"}'}, "Expected `float`, got `str`"),
    ({"id": "not-object", "payload": "[1, 2]"}, "Expected `object`, got `array`"),
    ({"id": "x" * 201, "payload": "{}"}, "at most 200 allowed"),
    ({"id": "bad-attempt", "attempt": "two", "payload": "{}"}, "'attempt' is not an integer"),
    ({"id": "zero-attempt", "attempt": "0", "payload": "{}"}, "'attempt' must be at least 1"),
    ({"id": "huge-attempt", "attempt": "2147483648", "payload": "{}"}, "at most 1000000 allowed"),
    ({"id": "oversized", "payload": '{"pad": "' + "a" * 3000 + '"}'}, "at most 2048"),
]


async def test_every_invalid_entry_fails_with_a_clear_error_and_the_worker_goes_on(deps: Deps):
    stream = deps.keys.stream(Q)
    for fields, _ in INVALID:
        await deps.redis.xadd(stream, fields)  # type: ignore[arg-type]
    good = await publisher(deps).publish(Q, handlers.Work())
    small = msgspec.structs.replace(deps.settings, max_payload_bytes=2048)
    async with running(engine(dataclasses.replace(deps, settings=small))):
        await eventually(lambda: all_terminal(deps, [good]))
        ids = [f["id"] if len(f["id"]) <= 200 else None for f, _ in INVALID]

        async def dead_count():
            return await deps.redis.xlen(deps.keys.dead(Q)) == len(INVALID)

        await eventually(dead_count)
    rows = {r["id"]: r for r in await deps.pool.fetch("SELECT * FROM jobs")}
    assert rows[good]["status"] == "completed"
    dead = await deps.redis.xrange(deps.keys.dead(Q))
    by_entry = {f[b"entry_id"].decode(): f for _, f in dead}
    assert len(by_entry) == len(INVALID)
    for (fields, expected), job_id in zip(INVALID, ids, strict=True):
        key = job_id if job_id is not None else None
        matching = [r for r in rows.values() if (key and r["id"] == key)]
        if key is None:  # an unusable id: recorded under the entry ID
            matching = [r for r in rows.values() if r["id"] == r["stream_entry_id"]]
        assert len(matching) == 1, fields.get("id", "")[:20]
        row = matching[0]
        assert row["status"] == "failed"
        assert expected in row["error"], (row["error"], expected)
        letter = by_entry[row["stream_entry_id"]]
        assert letter[b"reason"] == b"invalid"
        assert expected.encode() in letter[b"error"]
        h = await deps.redis.hgetall(deps.keys.job(row["id"]))
        assert h[b"status"] == b"failed"
    pending = await deps.redis.xpending(deps.keys.stream(Q), "workers")
    assert pending["pending"] == 0  # all acked


async def test_both_status_stores_agree(deps: Deps):
    pub = publisher(deps)
    ok = await pub.publish_many(Q, [handlers.Work() for _ in range(20)])
    bad = await pub.publish(Q, handlers.Work(permanent=True))
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [*ok, bad]))
    for job_id in [*ok, bad]:
        row = await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        h = {
            k.decode(): v.decode()
            for k, v in (await deps.redis.hgetall(deps.keys.job(job_id))).items()
        }
        assert h["status"] == row["status"]
        assert h["queue"] == row["queue"] == Q
        assert int(h["attempt"]) == row["attempts"]
        assert h["worker_id"] == row["worker_id"]
        assert h["completed_at"].startswith(row["completed_at"].strftime("%Y-%m-%dT%H:%M:%S"))
        if row["status"] == "completed":
            assert msgspec.json.decode(h["result"]) == msgspec.json.decode(row["result"])
            assert h["error"] == ""
        else:
            assert h["error"] == row["error"]
            assert "refused for good" in h["error"]
        ttl = await deps.redis.ttl(deps.keys.job(job_id))
        assert 0 < ttl <= deps.settings.hash_ttl_s
        execs = await deps.pool.fetch("SELECT * FROM job_executions WHERE job_id = $1", job_id)
        assert len(execs) == 1
        assert execs[0]["worker_id"] == row["worker_id"]
        assert execs[0]["outcome"] == row["status"]


async def test_ack_only_after_postgres_commit(deps: Deps):
    """While the jobs table cannot be written, nothing is acked; then it all completes."""
    await deps.pool.execute("ALTER TABLE jobs RENAME TO jobs_away")
    ids = await publisher(deps).publish_many(Q, [handlers.Work() for _ in range(5)])
    stream = deps.keys.stream(Q)
    async with running(engine(deps)) as eng:

        async def ran_all():
            return len(await executions(deps)) == 5

        await eventually(ran_all)
        await asyncio.sleep(0.5)  # several failed flush attempts
        pending = await deps.redis.xpending(stream, "workers")
        assert pending["pending"] == 5  # handlers ran, nothing acked

        async def unhealthy():  # health tells that outcomes are stuck, not only that it runs
            return "outcomes not recorded" in (eng.health() or "")

        await eventually(unhealthy, timeout_s=15)
        for i in ids:  # the view shows nothing the truth has not committed
            assert await deps.redis.hget(deps.keys.job(i), "status") == b"queued"
        await deps.pool.execute("ALTER TABLE jobs_away RENAME TO jobs")
        await eventually(lambda: all_terminal(deps, ids))

        async def acked():
            return (await deps.redis.xpending(stream, "workers"))["pending"] == 0

        await eventually(acked)
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert (await executions(deps)) == {i: 1 for i in ids}


async def test_redelivered_completed_job_is_acked_without_running(deps: Deps):
    stream = deps.keys.stream(Q)
    job_id = f"done-{uuid.uuid4().hex[:6]}"
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    eid = await deps.redis.xadd(stream, {"id": job_id, "payload": "{}"})
    # A replica that read it and died before acking, after PostgreSQL recorded completion
    # (in the row of the job's creation time: its entry's).
    await deps.redis.xreadgroup("workers", "ghost-replica", {stream: ">"}, count=10)
    await deps.pool.execute(
        "INSERT INTO jobs (id, queue, status, attempts, created_at) "
        "VALUES ($1, $2, 'completed', 1, to_timestamp($3::float8))",
        job_id, Q, entry_seconds(eid),
    )  # fmt: skip
    async with running(engine(deps)):

        async def acked():
            return (await deps.redis.xpending(stream, "workers"))["pending"] == 0

        await eventually(acked)
    assert await executions(deps) == {}
    assert (await statuses(deps, [job_id]))[job_id] == "completed"


async def test_two_workers_share_a_queue_without_running_a_job_twice(deps: Deps):
    ids = await publisher(deps).publish_many(Q, [handlers.Work() for _ in range(1500)])
    a, b = engine(deps), engine(deps)
    assert a.cfg.consumer != b.cfg.consumer
    async with running(a), running(b):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=60)
    counts = await executions(deps)
    assert counts == {i: 1 for i in ids}
    workers = await deps.pool.fetch("SELECT worker_id, count(*) AS n FROM jobs GROUP BY 1")
    assert {r["worker_id"] for r in workers} == {a.cfg.consumer, b.cfg.consumer}


async def test_analytics_counts_exact_under_duplicate_delivery(deps: Deps):
    pub = publisher(deps)
    events = [event(f"e{i}", ["open", "click", "sent"][i % 3], f"mb-{i % 2}") for i in range(90)]
    ids = await pub.publish_many("analytics", events)
    ids += await pub.publish_many("analytics", events[:30])  # the producer retried some
    async with running(make_engine(deps, ["analytics"])):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
    rows = await deps.pool.fetch(
        "SELECT mailbox_id, type, count FROM analytics_daily_mailbox ORDER BY 1, 2"
    )
    expected: dict[tuple[str, str], int] = {}
    for e in events:
        expected[(e.mailbox_id, e.type)] = expected.get((e.mailbox_id, e.type), 0) + 1
    assert {(r["mailbox_id"], r["type"]): r["count"] for r in rows} == expected
    results = await deps.pool.fetch("SELECT result FROM jobs WHERE queue = 'analytics'")
    recorded = [msgspec.json.decode(r["result"])["recorded"] for r in results]
    assert recorded.count(True) == 90
    assert recorded.count(False) == 30
    assert await deps.pool.fetchval("SELECT count(*) FROM analytics_events") == 90


async def test_publish_validates_everything_before_writing(deps: Deps):
    pub = publisher(deps)
    with pytest.raises(PublishError, match="unknown queue 'nope'"):
        await pub.publish("nope", {})
    with pytest.raises(PublishError, match="invalid payload"):
        await pub.publish_many("analytics", [event("ok-1"), {"event_id": "bad"}])
    assert await deps.redis.exists(deps.keys.stream("analytics")) == 0
    with pytest.raises(PublishError, match="at most 200"):
        await pub.publish("analytics", event("ok-2"), job_id="j" * 201)
    ids = await pub.publish_many("analytics", [event("ok-3"), event("ok-4")])
    assert len(ids) == 2
    assert await deps.redis.xlen(deps.keys.stream("analytics")) == 2


async def test_a_result_postgres_cannot_store_fails_no_other_job(deps: Deps):
    """jsonb refuses NUL characters: that one row loses its result, the batch goes through."""
    pub = publisher(deps)
    ok = await pub.publish_many(Q, [handlers.Work() for _ in range(10)])
    odd = await pub.publish(Q, handlers.Work(result_text="nul \x00 inside"))
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, [*ok, odd]))
    assert set((await statuses(deps, ok)).values()) == {"completed"}
    row = await deps.pool.fetchrow("SELECT status, result, error FROM jobs WHERE id = $1", odd)
    assert row["status"] == "completed"
    assert row["result"] is None
    assert "not storable" in row["error"]
    assert (await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0


async def test_bare_xadd_without_id_is_processed_end_to_end(deps: Deps):
    stream = deps.keys.stream("analytics")
    payload = msgspec.json.encode(event("evt-bare", "click"))
    entry_id = (await deps.redis.xadd(stream, {"payload": payload})).decode()
    async with running(make_engine(deps, ["analytics"])):
        await eventually(lambda: all_terminal(deps, [entry_id]))
    row = await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", entry_id)
    assert row["status"] == "completed"
    assert msgspec.json.decode(row["result"]) == {"recorded": True}
    assert row["attempts"] == 1
    assert row["stream_entry_id"] == entry_id
    pending = await deps.redis.xpending(stream, "workers")
    assert pending["pending"] == 0


def test_a_payload_postgres_refuses_is_a_permanent_failure():
    policy = Policy(max_attempts=10)
    exc = asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape")
    assert classify(exc, 1, policy) == (Outcome.FAILED, "permanent")
    assert classify(TimeoutError(), 1, policy)[0] is Outcome.RETRYING

"""Partitioned queues: spread by key or in turn, every partition read, nothing stranded when
the number of partitions changes, status and dead letters per queue across partitions."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams import Publisher, trim
from tests import handlers
from tests.helpers import all_terminal, event, eventually, jobstream, running

Q = handlers.QUEUE

# Each test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


def engine(deps: Deps, partitions: int) -> Any:
    policies = json.dumps({Q: {"partitions": partitions}}) if partitions > 1 else ""
    deps = dataclasses.replace(
        deps, settings=msgspec.structs.replace(deps.settings, policies=policies)
    )
    return make_engine(deps, None, None, handlers=handlers.SPECS)


def pub(deps: Deps, partitions: int) -> Publisher:
    return Publisher(deps.redis, deps.keys, handlers.PAYLOADS, partitions={Q: partitions})


async def lengths(deps: Deps, count: int) -> list[int]:
    return [
        int(await deps.redis.xlen(deps.keys.stream(deps.keys.part(Q, n)))) for n in range(count)
    ]


async def test_jobs_spread_over_partitions_and_all_run(deps: Deps):
    assert deps.keys.stream(deps.keys.part(Q, 0)) == deps.keys.stream(Q)  # P=1 keys unchanged
    assert deps.keys.stream(deps.keys.part(Q, 2)).endswith(f"jobs:{{{Q}#2}}")
    ids = await pub(deps, 4).publish_many(Q, [handlers.Work() for _ in range(200)])
    assert await lengths(deps, 4) == [50, 50, 50, 50]  # in turn, without a key
    async with running(engine(deps, 4)):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
    rows = await deps.pool.fetch("SELECT queue, status FROM jobs WHERE id = ANY($1)", ids)
    assert {(r["queue"], r["status"]) for r in rows} == {(Q, "completed")}
    assert await deps.redis.hget(deps.keys.job(ids[-1]), "queue") == Q.encode()
    for n in range(4):  # trimming works on each partition
        await trim(deps.redis, deps.keys, deps.keys.part(Q, n))
    assert all(length <= 1 for length in await lengths(deps, 4))


async def test_one_key_keeps_one_partition_and_its_order(deps: Deps):
    p = pub(deps, 4)
    ids = [await p.publish(Q, handlers.Work(), f"mb7-{i}", key="mailbox-7") for i in range(30)]
    counts = await lengths(deps, 4)
    assert sorted(counts) == [0, 0, 0, 30]
    part = deps.keys.part(Q, counts.index(30))
    entries: Any = await deps.redis.xrange(deps.keys.stream(part))
    assert [f[b"id"].decode() for _, f in entries] == ids  # in publication order
    for i in range(40):  # other keys use the other partitions too
        await p.publish(Q, handlers.Work(), key=f"mailbox-{i}")
    assert all(n > 0 for n in await lengths(deps, 4))


async def test_changing_partitions_strands_nothing(deps: Deps):
    # Published over 4 partitions, then read by workers configured with 1.
    old = await pub(deps, 4).publish_many(Q, [handlers.Work() for _ in range(40)])
    async with running(engine(deps, 1)) as e:
        await eventually(lambda: all_terminal(deps, old), timeout_s=30)
        # A publisher with more partitions while they run: read without a restart.
        new = await pub(deps, 6).publish_many(Q, [handlers.Work() for _ in range(60)])
        assert (await lengths(deps, 6))[5] == 10
        await eventually(lambda: all_terminal(deps, new), timeout_s=30)
        assert set(e.lanes) == {deps.keys.part(Q, n) for n in range(6)}


async def test_status_and_dead_letters_cover_every_partition(deps: Deps, env_for):
    ids = await pub(deps, 3).publish_many(Q, [handlers.Work(permanent=True) for _ in range(6)])
    async with running(engine(deps, 3)):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
    dead = [int(await deps.redis.xlen(deps.keys.dead(deps.keys.part(Q, n)))) for n in range(3)]
    assert dead == [2, 2, 2]
    env = env_for()
    status = await jobstream(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    mine = next(q for q in json.loads(status.stdout) if q["queue"] == Q)
    assert (mine["partitions"], mine["dead"], mine["jobs"]) == (3, 6, {"failed": 6})
    listed = await jobstream(env, "dlq", "list", Q)
    assert listed.returncode == 0, listed.stderr
    assert all(job_id in listed.stdout for job_id in ids)
    assert f"{Q}#" not in listed.stdout  # one queue, whatever partition holds the letter
    letter: Any = await deps.redis.xrange(deps.keys.dead(deps.keys.part(Q, 2)), count=1)
    shown = await jobstream(env, "dlq", "show", letter[0][0].decode())
    assert shown.returncode == 0, shown.stderr
    before = await lengths(deps, 3)  # the engine's trim may have taken acked entries
    replayed = await jobstream(env, "dlq", "replay", Q, "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 6 dead letters" in replayed.stdout
    # Each went back to its own partition (one slot per script).
    assert await lengths(deps, 3) == [n + 2 for n in before]
    async with running(engine(deps, 3)):
        await eventually(lambda: all_terminal(deps, ids), timeout_s=30)
    purged = await jobstream(env, "dlq", "purge", Q, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "purged 6 dead letters" in purged.stdout


async def test_cli_publishes_by_key_to_the_configured_partitions(deps: Deps, env_for):
    env = env_for(JOBSTREAM_POLICIES='{"analytics": {"partitions": 3}}')
    for i in range(4):
        payload = msgspec.json.encode(event(f"keyed-{i}", mailbox="mb-9")).decode()
        out = await jobstream(env, "publish", "analytics", payload, "--key", "mb-9")
        assert out.returncode == 0, out.stderr
    parts = [deps.keys.stream(deps.keys.part("analytics", n)) for n in range(3)]
    assert sorted([int(await deps.redis.xlen(s)) for s in parts]) == [0, 0, 4]

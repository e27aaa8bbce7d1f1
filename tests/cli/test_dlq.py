"""`jobstream dlq list|show|replay|purge` on real dead letters."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from typing import Any

import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.streams import Publisher, list_dead, purge_dead, replay_dead
from tests import handlers
from tests.helpers import all_terminal, engine, eventually, executions, jobstream, running

Q = handlers.QUEUE

# Each test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


@pytest.mark.timeout(300)  # many CLI runs, each a process; twice on a cluster
async def test_dlq_list_show_replay_purge(deps: Deps, env_for):
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    ids = await pub.publish_many(Q, [handlers.Work(permanent=True) for _ in range(3)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
    env = env_for()

    listed = await jobstream(env, "dlq", "list", Q)
    assert listed.returncode == 0, listed.stderr
    for job_id in ids:
        assert job_id in listed.stdout
    assert "permanent" in listed.stdout
    everywhere = await jobstream(env, "dlq", "list")
    assert ids[0] in everywhere.stdout

    dead = await deps.redis.xrange(deps.keys.dead(Q))
    dead_id = dead[0][0].decode()
    job_id = dead[0][1][b"job_id"].decode()
    shown = await jobstream(env, "dlq", "show", dead_id)
    assert shown.returncode == 0, shown.stderr
    fields = json.loads(shown.stdout)
    assert fields["job_id"] == job_id
    assert fields["reason"] == "permanent"
    assert json.loads(fields["payload"])["permanent"] is True
    assert (await jobstream(env, "dlq", "show", "1-1")).returncode == 1

    replayed = await jobstream(env, "dlq", "replay", Q, dead_id)
    assert replayed.returncode == 0, replayed.stderr
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 2
    row = await deps.pool.fetchrow("SELECT status, error FROM jobs WHERE id = $1", job_id)
    assert row["status"] == "queued"
    assert row["error"] is None
    entries: Any = await deps.redis.xrevrange(deps.keys.stream(Q), count=1)
    newest = entries[0][1]
    assert newest[b"id"].decode() == job_id
    assert newest[b"attempt"] == b"1"
    assert b"reason" not in newest
    missing = await jobstream(env, "dlq", "replay", Q, "1-1")
    assert missing.returncode == 2
    assert "no dead letter 1-1" in missing.stderr
    assert (await jobstream(env, "dlq", "replay", Q)).returncode == 2

    recent = await jobstream(env, "dlq", "purge", Q, "--older-than", "1d", "--yes")
    assert "purged 0" in recent.stdout
    bad = await jobstream(env, "dlq", "purge", Q, "--older-than", "soon", "--yes")
    assert bad.returncode == 2
    assert "invalid duration" in bad.stderr
    refused = await jobstream(env, "dlq", "purge", Q)  # no --yes, no terminal to ask
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    dry = await jobstream(env, "dlq", "purge", Q, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would purge 2 dead letters" in dry.stdout
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 2
    purged = await jobstream(env, "dlq", "purge", Q, "--yes")
    assert "purged 2" in purged.stdout
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0

    await jobstream(env, "dlq", "replay", Q, "--all")
    assert await deps.redis.xlen(deps.keys.stream(Q)) == 4  # nothing more to replay


async def _dead_letters(deps: Deps, n: int) -> list[str]:
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    ids = await pub.publish_many(Q, [handlers.Work(permanent=True) for _ in range(n)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
        await eventually(lambda: dead_count(deps, n))
    return ids


async def dead_count(deps: Deps, n: int) -> bool:
    return bool(await deps.redis.xlen(deps.keys.dead(Q)) == n)


async def test_replay_all_replays_each_letter_present_once_while_a_worker_fails_them_again(
    deps: Deps, env_for
):
    ids = await _dead_letters(deps, 60)
    async with running(engine(deps)):  # fails every replayed job again, at once
        out = await jobstream(env_for(), "dlq", "replay", Q, "--all")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"replayed 60 dead letters of {Q}"
        await eventually(lambda: dead_count(deps, 60), timeout_s=45)
        await eventually(lambda: all_terminal(deps, ids), timeout_s=45)
    assert await executions(deps) == {job_id: 2 for job_id in ids}


async def test_a_letter_replayed_twice_at_once_is_published_once(deps: Deps):
    await _dead_letters(deps, 1)
    (letter,) = await list_dead(deps.redis, deps.keys, Q)
    before = await deps.redis.xlen(deps.keys.stream(Q))
    entries = await asyncio.gather(
        *(replay_dead(deps.redis, deps.pool, deps.keys, letter) for _ in range(2))
    )
    assert sorted(e is None for e in entries) == [False, True]
    assert await deps.redis.xlen(deps.keys.stream(Q)) == before + 1
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0
    # A letter already gone (replayed, or purged) is not published again.
    assert await replay_dead(deps.redis, deps.pool, deps.keys, letter) is None
    assert await deps.redis.xlen(deps.keys.stream(Q)) == before + 1


async def test_purge_asks_at_a_terminal(deps: Deps, env_for):
    await _dead_letters(deps, 2)
    for answer, code, left in (("n", 1, 2), ("y", 0, 0)):
        primary, secondary = pty.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jobstream.consumers.cli", "dlq", "purge", Q,
                stdin=secondary, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env_for(),
            )  # fmt: skip
            os.write(primary, f"{answer}\n".encode())
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            os.close(primary)
            os.close(secondary)
        assert proc.returncode == code, err.decode()
        assert f"purge {left or 2} dead letters of {Q}? [y/N]" in err.decode()
        assert await deps.redis.xlen(deps.keys.dead(Q)) == left


async def test_a_replay_never_leaves_the_hash_behind_its_worker(deps: Deps):
    """The hash is set `queued` before the entry exists, fenced below any delivery of it:
    the worker that fails the replayed job again always has the last word in both stores."""
    (job_id,) = await _dead_letters(deps, 1)
    (letter,) = await list_dead(deps.redis, deps.keys, Q)
    async with running(engine(deps)):  # may run the new entry before replay_dead returns
        assert await replay_dead(deps.redis, deps.pool, deps.keys, letter) is not None
        await eventually(lambda: dead_count(deps, 1))
        await eventually(lambda: all_terminal(deps, [job_id]))
    hashed = await deps.redis.hgetall(deps.keys.job(job_id))
    row = await deps.pool.fetchrow("SELECT status, stream_entry_id FROM jobs WHERE id = $1", job_id)
    assert (hashed[b"status"], row["status"]) == (b"failed", "failed")
    entries: Any = await deps.redis.xrevrange(deps.keys.stream(Q), count=1)
    assert row["stream_entry_id"] == entries[0][0].decode()
    assert hashed[b"fence"].decode().startswith(f"{int(row['stream_entry_id'].split('-')[0]):020d}")


async def test_a_letter_purged_meanwhile_leaves_the_hash_as_it_was(deps: Deps):
    (job_id,) = await _dead_letters(deps, 1)
    (letter,) = await list_dead(deps.redis, deps.keys, Q)
    before = await deps.redis.hgetall(deps.keys.job(job_id))
    assert await purge_dead(deps.redis, deps.keys, Q) == 1
    assert await replay_dead(deps.redis, deps.pool, deps.keys, letter) is None
    assert await deps.redis.hgetall(deps.keys.job(job_id)) == before
    status = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    assert status == "failed"

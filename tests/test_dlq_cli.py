"""`jobstream dlq list|show|replay|purge` on real dead letters."""

from __future__ import annotations

import json
from typing import Any

from consumers.deps import Deps
from streams import Publisher
from tests import handlers
from tests.conftest import eventually, running
from tests.helpers import jobstream
from tests.test_engine import all_terminal, engine

Q = handlers.QUEUE


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

    recent = await jobstream(env, "dlq", "purge", Q, "--older-than", "1d")
    assert "purged 0" in recent.stdout
    bad = await jobstream(env, "dlq", "purge", Q, "--older-than", "soon")
    assert bad.returncode == 2
    assert "invalid duration" in bad.stderr
    purged = await jobstream(env, "dlq", "purge", Q)
    assert "purged 2" in purged.stdout
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 0

    await jobstream(env, "dlq", "replay", Q, "--all")
    assert await deps.redis.xlen(deps.keys.stream(Q)) == 4  # nothing more to replay

"""The `jobstream` command line, run as a user runs it: a subprocess with environment config."""

from __future__ import annotations

import json

import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from tests.helpers import event, jobstream, run

EVENT = (
    '{"event_id":"cli-1","type":"open","mailbox_id":"mb-1","occurred_at":"2026-11-30T10:00:00Z"}'
)

# Each test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


async def test_publish_worker_status_job_and_health(deps: Deps, env_for):
    env = env_for()
    out = await jobstream(env, "publish", "analytics", EVENT, "--id", "cli-job-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cli-job-1"
    bad = await jobstream(env, "publish", "analytics", '{"event_id": 5}')
    assert bad.returncode == 2
    assert "invalid payload" in bad.stderr
    unknown = await jobstream(env, "publish", "nope", "{}")
    assert unknown.returncode == 2
    assert "unknown queue 'nope'" in unknown.stderr

    status = await jobstream(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["queue"]: r for r in json.loads(status.stdout)}
    assert rows["analytics"]["length"] == 1
    assert rows["analytics"]["lag"] == 0  # no group yet: nothing is known to be lagging

    worker = await jobstream(env, "worker", "--queues", "analytics", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "job started job=cli-job-1 queue=analytics" in worker.stderr
    assert "job completed job=cli-job-1 queue=analytics" in worker.stderr

    status = await jobstream(env, "status", "--json")
    rows = {r["queue"]: r for r in json.loads(status.stdout)}
    assert rows["analytics"]["jobs"] == {"completed": 1}
    assert rows["analytics"]["pending"] == 0
    table = await jobstream(env, "status")
    assert "analytics" in table.stdout
    assert "completed=1" in table.stdout

    job = await jobstream(env, "job", "cli-job-1", "--json")
    info = json.loads(job.stdout)
    assert info["job"]["status"] == "completed"
    assert info["hash"]["status"] == "completed"
    assert info["executions"][0]["outcome"] == "completed"
    assert msgspec.json.decode(info["job"]["result"]) == {"recorded": True}
    text = await jobstream(env, "job", "cli-job-1")
    assert "executions:" in text.stdout
    missing = await jobstream(env, "job", "no-such-job")
    assert missing.returncode == 1

    assert (await jobstream(env, "health")).stdout.strip() == "ok"
    sick = await jobstream(env, "health", "--consumer", "not-a-worker")
    assert sick.returncode == 1
    assert "no live heartbeat" in sick.stdout


async def test_worker_refuses_unknown_queue_and_bad_config(deps: Deps, env_for):
    out = await jobstream(env_for(), "worker", "--queues", "nope")
    assert out.returncode == 2
    assert "no handler for queue nope" in out.stderr
    bad = await jobstream(
        env_for(JOBSTREAM_RECLAIM_IDLE_MS="x", JOBSTREAM_MAX_DELIVERIES="soon"), "status"
    )
    assert bad.returncode == 2
    assert "JOBSTREAM_MAX_DELIVERIES" in bad.stderr
    assert "soon" not in bad.stderr


async def test_redis_cli_style_bare_xadd_is_valid_input(deps: Deps, env_for):
    payload = msgspec.json.encode(event("bare-cli")).decode()
    redis_cli = ["redis-cli", "-u", deps.settings.redis_url]
    if deps.settings.redis_cluster:  # follow MOVED to the master of the stream's slot
        redis_cli.append("-c")
    out = await run(*redis_cli, "XADD", deps.keys.stream("analytics"), "*", "payload", payload)
    assert out.returncode == 0, out.stderr
    entry_id = out.stdout.strip()
    worker = await jobstream(env_for(), "worker", "--queues", "analytics", "--burst")
    assert worker.returncode == 0, worker.stderr
    row = await deps.pool.fetchrow("SELECT status, result FROM jobs WHERE id = $1", entry_id)
    assert row["status"] == "completed"

"""The README's main command: the demo pushes real jobs through every queue and exits 0."""

from __future__ import annotations

import pytest

from jobstream.consumers.worker.deps import Deps
from tests.helpers import jobstream

# Each test runs on one Redis and on a Redis Cluster of 3 masters with replicas.
pytestmark = pytest.mark.cluster_too


async def test_demo_runs_through_all_six_queues(deps: Deps, env_for):
    out = await jobstream(env_for(), "demo", "--events", "300", limit_s=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "counts equal the distinct events published" in text
    for queue in ("email-sending", "email:processing", "bounce", "warmup", "webhook", "analytics"):
        assert queue in text
    assert "one message per sent job, every webhook signed" in text
    assert "workers stopped (exit codes [0, 0])" in text
    counts = await deps.pool.fetch("SELECT queue, count(*) AS n FROM jobs GROUP BY queue")
    assert {r["queue"] for r in counts} == {
        "email-sending", "email:processing", "bounce", "warmup", "webhook", "analytics",
    }  # fmt: skip

"""Chaos: three worker processes, one SIGKILLed twice mid-flow and restarted (inv. 1, 3, 4)."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from consumers.deps import Deps
from streams import Publisher
from tests import handlers
from tests.conftest import eventually
from tests.test_engine import executions

Q = handlers.QUEUE
N = 20_000


async def spawn(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.handlers", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def completed(deps: Deps) -> int:
    return int(await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'"))


async def test_three_replicas_one_killed_twice_every_job_completed_once(
    deps: Deps, env_for, capsys: pytest.CaptureFixture[str]
):
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS, record_queued=False)
    ids: list[str] = []
    for _ in range(N // 2000):
        ids += await pub.publish_many(Q, [handlers.Work(sleep_s=0.005) for _ in range(2000)])
    env = env_for(JOBSTREAM_LOG_LEVEL="WARNING")
    procs = [await spawn(env) for _ in range(3)]
    rand = random.Random()
    kills = []
    try:
        for low, high in ((0.15, 0.35), (0.5, 0.7)):
            threshold = int(N * rand.uniform(low, high))

            async def reached(threshold: int = threshold) -> bool:
                return await completed(deps) >= threshold

            await eventually(reached, timeout_s=120, interval_s=0.1)
            procs[0].kill()  # SIGKILL: no drain, no records, no acks
            await procs[0].wait()
            kills.append(await completed(deps))
            procs[0] = await spawn(env)

        async def all_done() -> bool:
            return await completed(deps) == N

        await eventually(all_done, timeout_s=180, interval_s=0.2)

        async def nothing_pending() -> bool:
            pending = await deps.redis.xpending(deps.keys.stream(Q), "workers")
            return bool(pending["pending"] == 0)

        await eventually(nothing_pending, timeout_s=30)
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            await p.wait()
    rows = await deps.pool.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
    assert {r["status"]: r["n"] for r in rows} == {"completed": N}  # one row per job
    counts = await executions(deps)
    assert set(counts) == set(ids)
    extra = sum(counts.values()) - N
    with capsys.disabled():  # reported in the test run's output, pass or fail
        print(f"\nchaos: killed at {kills}; {extra} executions beyond one per job")  # noqa: T201
    # At-least-once: a kill can repeat what the dead replica ran but had not yet recorded.
    assert extra <= 0.02 * N

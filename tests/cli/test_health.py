"""`jobstream health`: Redis, PostgreSQL and this worker's own loops, for container checks."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.health import HealthReport, read_report
from tests.helpers import eventually, jobstream


async def test_health_follows_a_worker_through_its_life(
    deps: Deps, env_for, tmp_path: pathlib.Path
):
    health_file = str(tmp_path / "health.json")
    env = env_for(JOBSTREAM_HEALTH_FILE=health_file)
    down = await jobstream(env, "health")
    assert down.returncode == 1
    assert "no health file" in down.stdout

    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobstream.consumers.cli", "worker", "--processes", "1",
        "--queues", "analytics", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def healthy() -> bool:
            return bool((await jobstream(env, "health")).returncode == 0)

        await eventually(healthy, timeout_s=30, interval_s=0.3)
        report, problem = read_report(health_file, 30)
        assert problem is None
        assert report is not None
        assert report.pid == worker.pid
        assert await deps.redis.exists(deps.keys.alive(report.consumer))

        worker.send_signal(signal.SIGSTOP)  # frozen: the file and the heartbeat go stale
        try:

            async def stale() -> bool:
                return bool((await jobstream(env, "health")).returncode == 1)

            await eventually(stale, timeout_s=30, interval_s=0.5)
        finally:
            worker.send_signal(signal.SIGCONT)
        await eventually(healthy, timeout_s=30, interval_s=0.3)
    finally:
        worker.terminate()
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    assert not await asyncio.to_thread(os.path.exists, health_file)  # removed on clean exit


def test_a_report_naming_a_problem_is_unhealthy(tmp_path: pathlib.Path):
    import time

    import msgspec

    path = tmp_path / "h.json"
    path.write_bytes(msgspec.json.encode(HealthReport("w-1", 1, time.time(), "loop trim stopped")))
    assert read_report(str(path), 30)[1] == "loop trim stopped"
    path.write_bytes(msgspec.json.encode(HealthReport("w-1", 1, time.time() - 100, None)))
    assert "last reported" in (read_report(str(path), 30)[1] or "")
    path.write_text("{garbage")
    assert "unreadable" in (read_report(str(path), 30)[1] or "")

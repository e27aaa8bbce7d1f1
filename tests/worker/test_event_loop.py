"""The worker runs on uvloop where it is installed, and on asyncio's own loop otherwise."""

from __future__ import annotations

import sys

import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.streams.loop import loop_factory, loop_name, run
from tests.helpers import event, jobstream
from tests.helpers import run as run_command

# The CLI with uvloop made unimportable, as on a platform without it.
WITHOUT_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; "
    "from jobstream.consumers.cli.main import main; sys.exit(main())"
)


async def publish_one(deps: Deps, event_id: str) -> str:
    job_id: str = await deps.publisher.publish("analytics", event(event_id))
    return job_id


async def completed(deps: Deps, job_id: str) -> bool:
    row = await deps.pool.fetchrow("SELECT status, result FROM jobs WHERE id = $1", job_id)
    return row is not None and row["status"] == "completed"


async def test_the_worker_runs_on_uvloop_where_it_is_installed(deps: Deps, env_for):
    pytest.importorskip("uvloop")
    job_id = await publish_one(deps, "loop-uv")
    out = await jobstream(
        env_for(), "worker", "--processes", "1", "--burst", "--queues", "analytics"
    )
    assert out.returncode == 0, out.stderr
    assert "loop=uvloop" in out.stderr
    assert await completed(deps, job_id)


async def test_without_uvloop_the_worker_runs_on_asyncios_loop(deps: Deps, env_for):
    job_id = await publish_one(deps, "loop-plain")
    args = ("worker", "--processes", "1", "--burst", "--queues", "analytics")
    out = await run_command(sys.executable, "-c", WITHOUT_UVLOOP, *args, env=env_for())
    assert out.returncode == 0, out.stderr
    assert "loop=asyncio" in out.stderr
    assert await completed(deps, job_id)
    row = await deps.pool.fetchrow("SELECT result FROM jobs WHERE id = $1", job_id)
    assert msgspec.json.decode(row["result"]) == {"recorded": True}


async def test_the_plain_loop_can_be_chosen(deps: Deps, env_for):
    job_id = await publish_one(deps, "loop-chosen")
    env = env_for(JOBSTREAM_EVENT_LOOP="asyncio")
    out = await jobstream(env, "worker", "--processes", "1", "--burst", "--queues", "analytics")
    assert out.returncode == 0, out.stderr
    assert "loop=asyncio" in out.stderr
    assert await completed(deps, job_id)


async def test_a_loop_that_cannot_be_had_is_one_clear_line(env_for):
    args = ("worker", "--processes", "1", "--burst", "--queues", "analytics")
    env = env_for(JOBSTREAM_EVENT_LOOP="uvloop")
    out = await run_command(sys.executable, "-c", WITHOUT_UVLOOP, *args, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "jobstream: JOBSTREAM_EVENT_LOOP is uvloop, but uvloop is not installed"
    )
    out = await jobstream(env_for(JOBSTREAM_EVENT_LOOP="trio"), *args)
    assert out.returncode == 2
    assert "JOBSTREAM_EVENT_LOOP (auto, uvloop or asyncio)" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_uses_the_chosen_loop():
    async def which() -> str:
        return loop_name()

    assert run(which(), "asyncio") == "asyncio"
    expected = "uvloop" if loop_factory("auto") is not None else "asyncio"
    assert run(which(), "auto") == expected

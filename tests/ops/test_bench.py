"""The benchmarks start both ways, measure the servers they are given, and fail loudly.

No timing is asserted here: only that each benchmark runs, and refuses to print a figure
it did not measure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import run
from tests.servers import OwnRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
BENCHES = sorted(
    p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in {"__init__", "common"}
)
# Every benchmark that talks to Redis (adversarial only parses, in this process).
SERVED = ["inbound", "latency", "queues", "soak", "throughput"]
TINY = {
    "inbound": ["--n", "5", "--noop-n", "5"],
    "latency": ["--jobs", "5"],
    "queues": ["--n", "5", "--noop-n", "5"],
    "soak": ["--n", "5"],
    "throughput": ["--n", "5", "--repeat", "1"],
}


def test_every_benchmark_is_covered():
    assert set(SERVED) < set(BENCHES)
    assert {"latency", "queues", "throughput", "soak", "inbound", "adversarial"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
async def test_each_benchmark_starts_as_a_module_and_as_a_script(name: str, tmp_path: Path):
    as_module = await run(sys.executable, "-m", f"bench.{name}", "--help", env=_env(), cwd=ROOT)
    assert as_module.returncode == 0, as_module.stderr
    assert "usage:" in as_module.stdout
    # As a script, from another directory: nothing depends on where it was started.
    script = str(ROOT / "bench" / f"{name}.py")
    as_script = await run(sys.executable, script, "--help", env=_env(), cwd=tmp_path)
    assert as_script.returncode == 0, as_script.stderr
    assert as_script.stdout == as_module.stdout


@pytest.mark.parametrize("name", SERVED)
async def test_a_benchmark_given_a_dead_redis_fails_in_one_line(name: str):
    env = _env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    cmd = [sys.executable, "-m", f"bench.{name}", *TINY[name]]
    out = await run(*cmd, env=env, limit_s=120, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.splitlines() == ["bench: Redis at REDIS_URL does not answer: ConnectionError"]
    assert "jobs/s" not in out.stdout


async def test_throughput_measures_the_redis_it_is_given(own_redis: OwnRedis):
    """Its workers read the REDIS_URL they are given (once they read another server and
    printed 0 jobs/s with exit code 0): here only a private server has the jobs."""
    env = _env(REDIS_URL=own_redis.url)
    args = ["--n", "300", "--repeat", "1", "--processes", "2"]
    cmd = [sys.executable, "-m", "bench.throughput", *args]
    out = await run(*cmd, env=env, limit_s=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ratio engine / plain loop" in out.stdout
    assert "ratio 2 processes / 1 process" in out.stdout


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHONPATH"))}
    return {**env, **extra}

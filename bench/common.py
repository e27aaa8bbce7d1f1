"""Shared pieces of the benchmarks: the servers they measure (`REDIS_URL`, `DATABASE_URL`),
a scratch database and key prefix, the command line, a no-op queue, worker processes
started together, and the checks that make a benchmark fail loudly instead of printing a
wrong figure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.migrate import apply_migrations
from jobstream.streams import Job, Keys, Policy
from jobstream.streams.observe import NullObserver

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NOOP_QUEUE = "bench-noop"


class BenchError(Exception):
    """The benchmark cannot give a true figure: said in one line, exit code 1."""


class Noop(msgspec.Struct, frozen=True):
    """Payload of the benchmark's no-op queue."""

    n: int
    text: str = "hello"


@handler(NOOP_QUEUE, Noop, Policy(concurrency=64, timeout_s=30))
async def noop(payload: Noop, job: Job, deps: Deps) -> None:
    """Do nothing: what remains is the engine's own cost."""
    return None


NOOP: HandlerSpec[Any] = noop


def db_url(name: str) -> str:
    return f"{ADMIN_URL.rpartition('/')[0]}/{name}"


def bench_parser(description: str | None) -> argparse.ArgumentParser:
    """The benchmark's command line, with the hidden options its own worker processes are
    started with (`--worker --db DB --prefix P`); the caller adds the rest."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    return ap


def new_prefix(tag: str) -> str:
    """A key prefix of its own for one run: `tag`, eight random hex digits, a colon."""
    return f"{tag}{uuid.uuid4().hex[:8]}:"


def bench_keys(prefix: str) -> Keys:
    """The stream and job-hash keys under `prefix`, as a worker of `bench_settings` names them."""
    return Keys(f"{prefix}jobs:", f"{prefix}job:")


def bench_settings(db: str, prefix: str, **changes: Any) -> Settings:
    """A worker's settings: the benchmark's Redis and database, its own key prefix."""
    keys = bench_keys(prefix)
    fields: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "database_url": db,
        "stream_prefix": keys.prefix,
        "job_prefix": keys.job_prefix,
        "block_ms": 20,
        "log_level": "WARNING",
    }
    return Settings(**{**fields, **changes})


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker process: this one's (servers included), without OTEL_*
    unless given, and with the repository importable however the benchmark was started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["REDIS_URL"] = REDIS_URL
    env["DATABASE_URL"] = ADMIN_URL
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


async def check_servers() -> None:
    """Fail in one line, before anything is published, when a server does not answer."""
    r = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=5)
    try:
        await r.ping()
    except (OSError, redis.exceptions.RedisError) as exc:
        raise BenchError(f"Redis at REDIS_URL does not answer: {type(exc).__name__}") from None
    finally:
        await r.aclose()
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(
            f"PostgreSQL at DATABASE_URL does not answer: {type(exc).__name__}"
        ) from None
    await conn.close()


def require_drained(what: str, published: int, drained: int) -> None:
    """A run that drained fewer jobs than it published measured something else: fail."""
    if drained < published:
        raise BenchError(f"{what}: drained {drained} of the {published} jobs published")


def run_main(main: Callable[[], Awaitable[None]]) -> None:
    """Run a benchmark's main; a failure is one line on stderr and exit code 1."""
    try:
        asyncio.run(main())  # type: ignore[arg-type]
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
    except (OSError, redis.exceptions.RedisError, asyncpg.PostgresError) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A freshly migrated database, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(db_url(name))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield db_url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def drop_keys(prefix: str) -> None:
    """Delete every Redis key a benchmark made under `prefix`."""
    redis = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=5000)]
    for i in range(0, len(keys), 1000):
        await redis.delete(*keys[i : i + 1000])
    await redis.aclose()


@contextlib.asynccontextmanager
async def scratch_prefix(tag: str) -> AsyncIterator[str]:
    """A fresh key prefix (`new_prefix`) for one run; every key under it is deleted after."""
    prefix = new_prefix(tag)
    try:
        yield prefix
    finally:
        await drop_keys(prefix)


class Clock(NullObserver):
    """Observer noting when the first job started and how many finished, by outcome."""

    def __init__(self) -> None:
        self.done, self.failed, self.first = 0, 0, 0.0

    def job_started(self, queue: str) -> None:
        if not self.first:
            self.first = time.time()

    def job_finished(
        self, queue: str, outcome: str, duration_s: float, error_type: str | None = None
    ) -> None:
        self.done += 1
        self.failed += outcome != "completed"


async def burst_worker(
    settings: Settings,
    queues: Sequence[str] | None,
    handlers: Sequence[HandlerSpec[Any]],
    concurrency: int | None,
    after: Callable[[], None] | None = None,
) -> None:
    """One worker process: connect, say `ready`, wait for a line on stdin, drain the
    queues in burst mode, then print its figures as JSON (wall-clock times, so the
    figures of processes started together can be combined)."""
    clock = Clock()
    async with connect(settings) as deps:
        engine = make_engine(deps, queues, concurrency, burst=True, handlers=handlers)
        engine.observer = clock
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        started, cpu = time.time(), time.process_time()
        await engine.run()
        drained = time.time()
        if after is not None:
            after()  # e.g. the final span export, part of the cost
        ended = time.time()
    first = clock.first or started
    figures = {
        "jobs": engine.recorder.settled,
        "done": clock.done,
        "failed": clock.failed,
        "first": first,
        "ended": ended,
        "flush": ended - drained,
        "cpu": time.process_time() - cpu,
    }
    print(json.dumps(figures), flush=True)


async def run_workers(
    script: Path, args: Sequence[str], processes: int, env: dict[str, str]
) -> dict[str, float]:
    """Start `processes` worker processes of `script`, let them all go at once when all
    are connected, and combine their figures: jobs settled, seconds from the first job's
    start to the last process's end."""
    cmd = [sys.executable, str(script), "--worker", *args]
    pipe = asyncio.subprocess.PIPE
    procs = [
        await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stdin=pipe, stdout=pipe)
        for _ in range(processes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 120)
            if line.strip() != b"ready":
                raise BenchError(f"a worker process of {script.name} failed to start")
        cpu_before = await cores_used()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = [await p.communicate() for p in procs]
        cpu = {k: v - cpu_before[k] for k, v in (await cores_used()).items()}
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    if any(p.returncode for p in procs):
        raise BenchError(f"a worker process of {script.name} failed")
    figures = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    return {
        "jobs": sum(f["jobs"] for f in figures),
        "done": sum(f["done"] for f in figures),
        "failed": sum(f["failed"] for f in figures),
        "seconds": max(f["ended"] for f in figures) - min(f["first"] for f in figures),
        "flush": max(f["flush"] for f in figures),
        "cpu": sum(f["cpu"] for f in figures),
        **cpu,
    }


async def redis_cpu_s() -> float:
    """CPU seconds the Redis server has used so far (user + system, all its threads)."""
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        info: Any = await r.info("cpu")
    finally:
        await r.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def cores_used() -> dict[str, float]:
    """CPU seconds so far of the Redis server and of the whole machine, and the time."""
    return {"redis_cpu": await redis_cpu_s(), "busy": machine_busy_s(), "wall": time.time()}


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_note() -> str:
    """The load average, to print beside the figures: the machine may be shared."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"

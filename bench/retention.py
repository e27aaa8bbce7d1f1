"""Retention soak: the job tables stay flat in size over a run longer than their retention.

    python -m bench.retention --rate 400 --retention-s 120 --width-s 30 --duration-s 360

Publishes no-op jobs at a steady rate to one worker whose retention is minutes and whose
partitions are --width-s wide (pruning every --prune-s instead of daily), samples the size
of `jobs` and `job_executions` (every partition, indexes included), their rows and
partitions as it goes, and prints them with a verdict. Exits 1 when the tables were not
kept bounded: no partition dropped, the size still growing once the retention applies,
or the jobs not done.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/X.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import os
import signal
import time
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from bench import common
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Publisher

SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint AS bytes,
       count(*) FILTER (WHERE i.inhparent = 'jobs'::regclass) AS partitions
FROM pg_inherits i WHERE i.inhparent IN ('jobs'::regclass, 'job_executions'::regclass)
"""
ROWS_SQL = """
SELECT (SELECT count(*) FROM jobs) AS jobs,
       (SELECT count(*) FROM jobs WHERE status = 'completed') AS completed,
       (SELECT count(*) FROM job_executions) AS executions,
       (SELECT min(created_at) FROM jobs) AS oldest
"""


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float
    published: int
    jobs: int
    executions: int
    partitions: int
    bytes: int
    oldest_age_s: float


async def worker(db: str, prefix: str, width_s: int, retention_s: float, prune_s: float) -> None:
    settings = Settings(
        database_url=db,
        stream_prefix=f"{prefix}jobs:",
        job_prefix=f"{prefix}job:",
        trim_interval_s=1.0,
        hash_ttl_s=30,
        log_level="WARNING",
        partition_width_s=width_s,
        retention_s=retention_s,
        prune_interval_s=prune_s,
    )
    async with connect(settings) as deps:
        engine = make_engine(deps, None, 64, handlers=[common.NOOP])
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, engine.stop)
        await engine.run()


async def sample(conn: asyncpg.Connection, started: float, published: int) -> Sample:
    size = await conn.fetchrow(SIZE_SQL)
    rows = await conn.fetchrow(ROWS_SQL)
    age = time.time() - rows["oldest"].timestamp() if rows["oldest"] else 0.0
    return Sample(time.perf_counter() - started, published, rows["jobs"], rows["executions"],
                  size["partitions"], size["bytes"], age)  # fmt: skip


async def publish_steadily(pub: Publisher, rate: int, duration_s: float, count: list[int]) -> None:
    """Publish `rate` jobs a second, a tenth of a second at a time, for `duration_s`;
    `count[0]` says how many so far."""
    started, tick = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < duration_s:
        due = int(rate * elapsed) - count[0]
        if due > 0:
            await pub.publish_many(common.NOOP_QUEUE, [common.Noop(n=i) for i in range(due)])
            count[0] += due
        tick += 1
        await asyncio.sleep(max(0.0, tick * 0.1 - (time.perf_counter() - started)))


def verdict(samples: list[Sample], args: argparse.Namespace, completed: int) -> list[str]:
    """What went wrong (nothing: the tables stayed bounded)."""
    problems = []
    settle_s = args.retention_s + 2 * args.width_s + args.prune_s
    steady = [s for s in samples if s.at_s >= settle_s]
    if args.duration_s < settle_s + 2 * args.width_s or len(steady) < 4:
        problems.append(f"the run is too short to show retention at work (>= {settle_s:.0f}s "
                        "of settling plus two partitions)")  # fmt: skip
        return problems
    if max(s.oldest_age_s for s in steady) > settle_s + args.width_s:
        problems.append("jobs older than the retention stayed: no partition was dropped")
    half = len(steady) // 2
    first, second = max(s.bytes for s in steady[:half]), max(s.bytes for s in steady[half:])
    if second > first * 1.25:
        problems.append(f"size still growing after the retention applied: {first} -> {second}")
    kept = samples[-1].jobs
    if kept == 0 or completed < kept:
        problems.append(f"the worker did not keep up: {completed} of {kept} jobs completed")
    return problems


async def main(args: argparse.Namespace) -> int:
    prefix = common.new_prefix("r")
    keys = common.bench_keys(prefix)
    r = aioredis.Redis.from_url(common.REDIS_URL)
    samples: list[Sample] = []
    async with common.scratch_database() as db:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.retention", "--worker", "--db", db, "--prefix", prefix,
            "--width-s", str(args.width_s), "--retention-s", str(args.retention_s),
            "--prune-s", str(args.prune_s), env=env,
        )  # fmt: skip
        conn = await asyncpg.connect(db)
        pub = Publisher(r, keys, {common.NOOP_QUEUE: common.Noop}, record_queued=False)
        try:
            await asyncio.sleep(2.0)
            started = time.perf_counter()
            count = [0]
            task = asyncio.create_task(publish_steadily(pub, args.rate, args.duration_s, count))
            while not task.done():
                await asyncio.sleep(args.sample_s)
                samples.append(await sample(conn, started, count[0]))
                s = samples[-1]
                print(f"{s.at_s:7.0f}s  {s.jobs:>8} jobs {s.executions:>8} executions  "
                      f"{s.partitions:>3} partitions  {s.bytes / 2**20:7.1f} MB  "
                      f"oldest {s.oldest_age_s:5.0f}s", flush=True)  # fmt: skip
            await task
            published = count[0]
            for _ in range(600):  # the worker finishes what was published: at most a minute
                done = await conn.fetchrow(ROWS_SQL)
                if done["completed"] == done["jobs"]:
                    break
                await asyncio.sleep(0.1)
            completed = done["completed"]
            samples.append(await sample(conn, started, published))
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await conn.close()
            await r.aclose()
            await common.drop_keys(prefix)
    return report(samples, args, completed, published)


def report(samples: list[Sample], args: argparse.Namespace, completed: int, published: int) -> int:
    last = samples[-1]
    per_job = last.bytes / last.jobs if last.jobs else 0.0
    print(f"published {published} jobs at {args.rate}/s over {args.duration_s:.0f}s; "
          f"retention {args.retention_s:.0f}s, partitions {args.width_s}s wide")  # fmt: skip
    mb = last.bytes / 2**20
    print(f"at the end: {last.jobs} jobs, {last.executions} executions, {last.partitions} "
          f"partitions, {mb:.1f} MB ({per_job:.0f} bytes per job kept)")  # fmt: skip
    print(f"largest size seen: {max(s.bytes for s in samples) / 2**20:.1f} MB; without "
          f"retention it would hold all {published} jobs")  # fmt: skip
    problems = verdict(samples, args, completed)
    for p in problems:
        print(f"FAIL: {p}")
    if not problems:
        print("OK: the job tables stayed bounded by the retention")
    return 1 if problems else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.bench_parser(__doc__)
    ap.add_argument("--rate", type=int, default=400, help="jobs published per second")
    ap.add_argument("--retention-s", type=float, default=120.0)
    ap.add_argument("--width-s", type=int, default=30, help="partition width")
    ap.add_argument("--prune-s", type=float, default=10.0, help="prune this often")
    ap.add_argument("--duration-s", type=float, default=360.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    if a.worker:
        asyncio.run(worker(a.db, a.prefix, a.width_s, a.retention_s, a.prune_s))
    else:
        sys.exit(asyncio.run(main(a)))

"""PostgreSQL capacity: jobs/s of the engine's own writes, and bytes per job kept.

    python -m bench.pg_capacity --seconds 20 --writers 4 --batch 500

Drives PostgreSQL alone (no Redis, no handler) with what a worker writes for each job,
through the engine's own statement (`write_batch`): a flush recording the job `running`,
then a flush recording it `completed` with its execution row (`--flushes 1`: only the
latter, as when a short job's two records share a flush), `--batch` jobs a flush,
from `--writers` connections at once (as that many worker replicas would). Prints the
jobs/s sustained, then the size of `jobs` and `job_executions` (every partition, indexes
included) per job, as written (with the dead row versions the update to `completed`
leaves, which autovacuum makes reusable) and live only (after VACUUM FULL).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/X.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import time
import uuid

import asyncpg

from bench import common
from jobstream.streams import PartitionPolicy, ensure_partitions
from jobstream.streams.pg_store import ExecRow, JobRow, write_batch

PAYLOAD = '{"n": 1, "text": "hello"}'  # the no-op queue's payload, as bench.throughput
SIZE_SQL = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint
FROM pg_inherits i WHERE i.inhparent IN ('jobs'::regclass, 'job_executions'::regclass)
"""


def _rows(prefix: str, n: int, now: float) -> tuple[list[JobRow], list[JobRow], list[ExecRow]]:
    running, done, execs = [], [], []
    for i in range(n):
        job_id, entry = f"{prefix}-{i}", f"{int(now * 1000)}-{i}"
        fence = f"{int(now * 1000):020d}{i:020d}{1:010d}"
        running.append(JobRow(job_id, "bench-noop", "running", PAYLOAD, None, None, 1, entry,
                              now, now, None, None, fence))  # fmt: skip
        done.append(JobRow(job_id, "bench-noop", "completed", PAYLOAD, "null", None, 1, entry,
                           now, now, now + 0.001, None, fence))  # fmt: skip
        execs.append(ExecRow(job_id, 1, "completed", None, 1, now, now + 0.001, entry, 1, now))
    return running, done, execs


async def writer(
    pool: asyncpg.Pool, batch: int, flushes: int, until: float, counts: list[int]
) -> None:
    while time.perf_counter() < until:
        # Whole milliseconds, as entry IDs give them: a job's creation time.
        now = int(time.time() * 1000) / 1000
        running, done, execs = _rows(uuid.uuid4().hex[:12], batch, now)
        if flushes == 2:
            await write_batch(pool, "bench", running, [])
        await write_batch(pool, "bench", done, execs)
        counts[0] += batch


async def main(seconds: float, writers: int, batch: int, flushes: int) -> None:
    async with common.scratch_database() as db:
        pool = await asyncpg.create_pool(db, min_size=writers, max_size=writers)
        try:
            async with pool.acquire() as conn:
                await ensure_partitions(conn, PartitionPolicy())
            counts = [0]
            started = time.perf_counter()
            until = started + seconds
            jobs_ = (writer(pool, batch, flushes, until, counts) for _ in range(writers))
            await asyncio.gather(*jobs_)
            elapsed = time.perf_counter() - started
            async with pool.acquire() as conn:
                jobs = await conn.fetchval("SELECT count(*) FROM jobs")
                written = await conn.fetchval(SIZE_SQL)
                await conn.execute("VACUUM FULL jobs, job_executions")
                vacuumed = await conn.fetchval(SIZE_SQL)
        finally:
            await pool.close()
    rate = counts[0] / elapsed
    how = "2 flushes a job: running, completed" if flushes == 2 else "1 flush a job: completed"
    print(f"{counts[0]} jobs in {elapsed:.1f}s: {rate:,.0f} jobs/s ({writers} writers, "
          f"{batch} jobs a flush, {how})")  # fmt: skip
    print(f"{jobs} jobs kept: {written / 2**20:.1f} MB as written, {written / jobs:.0f} bytes "
          f"per job; {vacuumed / jobs:.0f} bytes per job live (after VACUUM FULL)")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument(
        "--flushes",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: `running` has a flush of its own (jobs longer than a flush); 1: it rides "
        "with the outcome (short jobs, as the no-op benchmarks)",
    )
    a = ap.parse_args()
    asyncio.run(main(a.seconds, a.writers, a.batch, a.flushes))

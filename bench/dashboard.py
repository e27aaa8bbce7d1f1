"""How long the dashboard's API takes to answer on a large `jobs` table.

Fills a scratch database with `--jobs` rows (by SQL, spread over six queues and five
statuses, a tenth failed) and a queue with `--dead` dead letters, then times each request
against a running `jobstream dashboard` (median of `--repeat`).

    python -m bench.dashboard --jobs 1000000 --dead 1000
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/X.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import time

import asyncpg
import httpx
import redis.asyncio as aioredis

from bench import common
from jobstream.streams import Keys
from jobstream.streams.dead_letters import dead_fields

TOKEN = "bench-token-0123456789abcdef"
FILL_SQL = """
INSERT INTO jobs (id, queue, status, error, attempts, payload, created_at, updated_at)
SELECT 'job-' || i,
       (ARRAY['analytics', 'bounce', 'email-sending', 'email:processing', 'warmup',
              'webhook'])[1 + i % 6],
       CASE WHEN i % 10 = 0 THEN 'failed' WHEN i % 10 = 1 THEN 'retrying' ELSE 'completed' END,
       CASE WHEN i % 10 = 0 THEN 'endpoint answered 500' END, 1, '{"n": 1}',
       timestamptz '2026-01-01' + i * interval '10 seconds', now()
FROM generate_series(1, $1) AS i
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _fill(url: str, keys: Keys, jobs: int, dead: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        await conn.execute(FILL_SQL, jobs)
        await conn.execute("ANALYZE jobs")
        print(f"filled {jobs:,} jobs in {time.monotonic() - started:.1f} s")
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(common.REDIS_URL)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(dead):
            fields = dead_fields(
                {b"id": f"dl-{i}".encode(), b"payload": b'{"n": 1}'},
                queue="webhook", job_id=f"dl-{i}", entry_id=f"{i + 1}-0", reason="exhausted",
                error="endpoint answered 500", attempts=10, failed_at=time.time(),
            )  # fmt: skip
            pipe.xadd(keys.dead("webhook"), fields)
        await pipe.execute()
    await r.aclose()


async def _clean(prefix: str) -> None:
    r = aioredis.Redis.from_url(common.REDIS_URL)
    found = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
    if found:
        await r.delete(*found)
    await r.aclose()


def _time(client: httpx.Client, path: str, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        answer = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        size = len(answer.content)
    return statistics.median(times), size


def _serve_and_time(env: dict[str, str], repeat: int) -> None:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobstream.consumers.cli", "dashboard", "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=120) as client:  # fmt: skip
            for _ in range(100):
                try:
                    client.get("/login")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            first = client.get("/api/jobs").json()["next"]
            paths = [
                "/api/jobs",
                f"/api/jobs?before={first}",
                "/api/jobs?status=failed",
                "/api/jobs?queue=analytics&status=failed",
                "/api/jobs?id=job-123456",
                "/api/jobs/job-10",
                "/api/dead?queue=webhook",
                "/api/queues",
                "/jobs",
                "/jobs?status=failed",
                "/dead?queue=webhook",
                "/",
            ]
            for path in paths:
                ms, size = _time(client, path, repeat)
                print(f"{path:<42} {ms:8.1f} ms  ({size:,} bytes)")
    finally:
        proc.terminate()
        proc.wait(10)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--dead", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    prefix = common.new_prefix("bench")
    keys = common.bench_keys(prefix)
    async with common.scratch_database() as url:
        try:
            await _fill(url, keys, args.jobs, args.dead)
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "REDIS_URL": common.REDIS_URL,
                "JOBSTREAM_STREAM_PREFIX": keys.prefix,
                "JOBSTREAM_JOB_PREFIX": keys.job_prefix,
                "JOBSTREAM_DASHBOARD_TOKEN": TOKEN,
                "JOBSTREAM_LOG_LEVEL": "WARNING",
            }
            await asyncio.to_thread(_serve_and_time, env, args.repeat)
        finally:
            await _clean(prefix)


if __name__ == "__main__":
    asyncio.run(main())

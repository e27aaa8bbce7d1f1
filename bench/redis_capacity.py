"""What one Redis master gives this engine: its CPU per job, and the bytes a job holds.

    python -m bench.redis_capacity --n 50000
    python -m bench.redis_capacity --n 50000 --cluster    # 3 masters, each with a replica

Starts a private `redis-server` (no persistence, so the figures are Redis's own work),
publishes N no-op jobs as the Python publisher does (status hash + entry), drains them
with one engine (PostgreSQL row + execution row + hash + ack), and reads Redis's own
counters: CPU seconds (`INFO cpu`) and memory (`INFO memory`, `MEMORY USAGE`). Redis runs
commands on one core, so 1 / (CPU per job) is the most jobs/s one master can carry.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/X.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import pathlib
import subprocess
import tempfile
import time
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster

from bench import common
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Publisher, trim
from jobstream.streams.redis_client import is_cluster
from tests.cluster_servers import OwnCluster
from tests.servers import free_port


def _masters(info: Any) -> list[dict[str, Any]]:
    """INFO of the one server, or of every master of a cluster (node → INFO)."""
    return list(info.values()) if "redis_version" not in info else [info]


async def _info(r: Any, section: str) -> list[dict[str, Any]]:
    if is_cluster(r):
        return _masters(await r.info(section, target_nodes=RedisCluster.PRIMARIES))
    return [await r.info(section)]


async def _cpu(r: Any) -> float:
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in await _info(r, "cpu"))


async def _mem(r: Any) -> int:
    return sum(int(i["used_memory"]) for i in await _info(r, "memory"))


async def measure(n: int, concurrency: int, cluster: bool) -> dict[str, Any]:
    if cluster:
        with tempfile.TemporaryDirectory() as folder:
            nodes = OwnCluster(pathlib.Path(folder))
            try:
                await asyncio.to_thread(nodes.start)
                async with common.scratch_database() as db:
                    settings = Settings(redis_url=nodes.url, redis_cluster=True, database_url=db)
                    async with connect(settings) as deps:
                        return await _run(deps, n, concurrency)
            finally:
                await asyncio.to_thread(nodes.stop)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(  # noqa: ASYNC220 (the benchmark does nothing else meanwhile)
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder, "--logfile", str(pathlib.Path(folder) / "log")]
        )  # fmt: skip
        try:
            await asyncio.sleep(0.5)
            async with common.scratch_database() as db:
                settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", database_url=db)
                async with connect(settings) as deps:
                    return await _run(deps, n, concurrency)
        finally:
            server.kill()
            server.wait()


async def _run(deps: Any, n: int, concurrency: int) -> dict[str, Any]:
    r, keys = deps.redis, deps.keys
    pub = Publisher(r, keys, {common.NOOP_QUEUE: common.Noop})
    mem0, cpu0 = await _mem(r), await _cpu(r)
    for i in range(0, n, 1000):
        await pub.publish_many(
            common.NOOP_QUEUE, [common.Noop(n=j) for j in range(i, min(i + 1000, n))]
        )
    cpu1, mem1 = await _cpu(r), await _mem(r)
    stream = keys.stream(common.NOOP_QUEUE)
    stream_bytes = int(await r.memory_usage(stream, samples=0))
    queued_hash = await _hash_bytes(r, keys, "queued")
    engine = make_engine(deps, None, concurrency, handlers=[common.NOOP], burst=True)
    started = time.perf_counter()
    await engine.run()
    seconds = time.perf_counter() - started
    cpu2, mem2 = await _cpu(r), await _mem(r)
    done_hash = await _hash_bytes(r, keys, "completed")
    await trim(r, keys, common.NOOP_QUEUE)
    trimmed = int(await r.memory_usage(stream, samples=0))
    per_job_us = (cpu2 - cpu1) / n * 1e6
    publish_us = (cpu1 - cpu0) / n * 1e6
    return {
        "jobs": n,
        "engine_jobs_per_s": round(engine.processed / seconds),
        "redis_cpu_share_while_draining": round((cpu2 - cpu1) / seconds, 2),  # of one core
        "redis_cpu_us_per_job_publish": round(publish_us, 1),
        "redis_cpu_us_per_job_run": round(per_job_us, 1),
        # Redis runs commands on one core: on a cluster the CPU is summed over the masters.
        "one_core_ceiling_jobs_per_s": round(1e6 / (publish_us + per_job_us)),
        "bytes_per_job_queued": round((mem1 - mem0) / n),
        "stream_bytes_per_entry": round(stream_bytes / n),
        "hash_bytes_queued": queued_hash,
        "hash_bytes_completed": done_hash,
        "bytes_per_job_after_run": round((mem2 - mem0) / n),  # trimmed as it ran
        "stream_bytes_after_trim": trimmed,
    }


async def _hash_bytes(r: Any, keys: Any, status: str) -> int:
    """Mean MEMORY USAGE of 200 job hashes of that status."""
    sizes = []
    async for key in r.scan_iter(match=keys.job("*"), count=1000):
        if (await r.hget(key, "status")) == status.encode():
            sizes.append(int(await r.memory_usage(key, samples=0)))
        if len(sizes) >= 200:
            break
    return round(sum(sizes) / max(1, len(sizes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cluster", action="store_true", help="on a cluster of 3 masters")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.n, args.concurrency, args.cluster))
    print(msgspec.json.format(json.dumps(figures).encode()).decode())


if __name__ == "__main__":
    main()

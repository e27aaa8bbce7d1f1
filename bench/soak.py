"""Soak: 200,000 jobs through one worker; the stream stays bounded and RSS stays flat.

    python -m bench.soak --n 200000

Publishes steadily (never more than --max-lag ahead of the worker), samples the stream
length and the worker's resident memory as it goes, and prints the samples and a verdict.
Exits non-zero when the worker dies or completes fewer jobs than were published.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/soak.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import signal
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import common
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.streams import Publisher

SCRIPT = Path(__file__).resolve()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def worker(db: str, prefix: str) -> None:
    settings = common.bench_settings(db, prefix, block_ms=1000, trim_interval_s=1.0, hash_ttl_s=30)
    async with connect(settings) as deps:
        engine = make_engine(deps, None, 64, handlers=[common.NOOP])
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, engine.stop)
        await engine.run()


async def _completed(db: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'"))
    finally:
        await conn.close()


async def lag(r: aioredis.Redis, stream: str) -> int:
    """Entries the workers' group has not acked: every entry while the group does not exist
    yet (the worker is starting), and at least 1 while Redis cannot count its lag (after a
    trim) but the group has not read up to the newest entry."""
    try:
        groups: Any = await r.xinfo_groups(stream)
    except aioredis.ResponseError:  # no stream yet
        return 0
    ours = [g for g in groups if g["name"] in (b"workers", "workers")]
    if not ours:
        return int(await r.xlen(stream))
    group = ours[0]
    behind = group.get("lag")
    if behind is None:
        newest = (await r.xinfo_stream(stream))["last-generated-id"]
        behind = 0 if group["last-delivered-id"] == newest else 1
    return int(behind) + int(group["pending"])


async def main(n: int, max_lag: int) -> None:
    await common.check_servers()
    prefix = common.new_prefix("s")
    keys = common.bench_keys(prefix)
    stream = keys.stream(common.NOOP_QUEUE)
    r = aioredis.Redis.from_url(common.REDIS_URL)
    async with common.scratch_database() as db:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--worker", "--db", db, "--prefix", prefix,
            env=common.worker_env(),
        )  # fmt: skip
        pub = Publisher(r, keys, {common.NOOP_QUEUE: common.Noop}, record_queued=False)
        samples: list[tuple[int, int, float]] = []
        published, started = 0, time.perf_counter()
        try:
            await asyncio.sleep(1.0)
            while published < n:
                if proc.returncode is not None:
                    raise common.BenchError(f"the worker exited with {proc.returncode}")
                if await lag(r, stream) > max_lag:
                    await asyncio.sleep(0.01)
                    continue
                batch = min(2000, n - published)
                await pub.publish_many(common.NOOP_QUEUE, [common.Noop(n=i) for i in range(batch)])
                published += batch
                if published % 20_000 == 0:
                    samples.append((published, int(await r.xlen(stream)), rss_mb(proc.pid)))
            for _ in range(6000):  # drain: at most 10 minutes
                if not await lag(r, stream) or proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.5)  # one more trim pass
            samples.append((published, int(await r.xlen(stream)), rss_mb(proc.pid)))
            seconds = time.perf_counter() - started
            done = await _completed(db)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await r.aclose()
            await common.drop_keys(prefix)
    common.require_drained("soak", n, done)
    print(f"{n} jobs in {seconds:.1f}s ({n / seconds:,.0f} jobs/s), publisher kept <= "
          f"{max_lag} ahead; {common.load_note()}")  # fmt: skip
    print(f"{'published':>10} {'stream length':>14} {'worker RSS MB':>14}")
    for done, length, rss in samples:
        print(f"{done:>10} {length:>14} {rss:>14.1f}")
    warm = samples[min(1, len(samples) - 1)][2]
    end = samples[-1][2]
    longest = max(s[1] for s in samples)
    print(f"longest stream seen: {longest} entries (of {n} published)")
    print(f"RSS after warm-up {warm:.1f} MB, at the end {end:.1f} MB ({(end - warm) / warm:+.1%})")
    half = samples[len(samples) // 2][2]
    print(f"RSS over the second half: {half:.1f} MB -> {end:.1f} MB ({(end - half) / half:+.1%})")


if __name__ == "__main__":
    ap = common.bench_parser(__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--max-lag", type=int, default=10_000)
    a = ap.parse_args()
    if a.worker:
        common.run_main(lambda: worker(a.db, a.prefix))
    else:
        common.run_main(lambda: main(a.n, a.max_lag))

"""The `analytics` queue against the no-op queue and the plain loop, in one run.

    python -m bench.analytics --n 20000 --repeat 3
    python bench/analytics.py --n 20000 --profile /tmp/prof   # py-spy each worker

Publishes N analytics events (10 % of them duplicates, across mailboxes, campaigns, types
and days) and drains them with one worker process; drains N no-op jobs the same way; and
drains N no-op jobs with the plain redis-py loop doing the same writes (`bench.throughput`).
Runs are interleaved, and the medians are printed with two ratios: no-op engine / plain
loop, and analytics / no-op engine. Exits non-zero when a run drained fewer jobs than were
published, or when the events and per-day counters in PostgreSQL are not exactly right.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import pathlib
import shutil
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as `python bench/analytics.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import asyncpg
import redis.asyncio as aioredis

from bench import common
from bench.throughput import plain_loop
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.schema.payloads import PAYLOADS, AnalyticsEvent
from jobstream.streams import Publisher
from jobstream.streams.observe import NullObserver

TYPES = ("sent", "delivered", "open", "click", "bounce", "reply")
DUPLICATES = 0.1


def events(n: int) -> list[AnalyticsEvent]:
    """N events, one in ten a duplicate of an earlier one (a producer that retried)."""
    base = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    unique = n - int(n * DUPLICATES)
    out = [
        AnalyticsEvent(
            event_id=f"ev-{i}",
            type=TYPES[i % len(TYPES)],  # type: ignore[arg-type]
            mailbox_id=f"mb-{i % 50}",
            occurred_at=base + dt.timedelta(minutes=i % 4000),
            campaign_id=f"cmp-{i % 20}" if i % 3 else None,
            message_id=f"<m{i}@example.com>",
            properties={"ua": "Mozilla/5.0", "link": f"https://example.com/l/{i % 100}"},
        )
        for i in range(unique)
    ]
    return out + out[: n - unique]


class _Clock(NullObserver):
    """Observer that notes when the first job started."""

    def __init__(self) -> None:
        self.first = 0.0

    def job_started(self, queue: str) -> None:
        if not self.first:
            self.first = time.perf_counter()


async def worker(db: str, prefix: str, queue: str, concurrency: int | None) -> None:
    """The engine side, in its own process: drain the queue, print JSON figures."""
    clock = _Clock()
    async with connect(common.bench_settings(db, prefix)) as deps:
        served = [common.NOOP] if queue == common.NOOP_QUEUE else HANDLERS
        queues = None if queue == common.NOOP_QUEUE else [queue]
        engine = make_engine(deps, queues, concurrency, burst=True, handlers=served, observer=clock)
        started = time.perf_counter()
        await engine.run()
        ended = time.perf_counter()
    first = clock.first or started
    print(json.dumps({"jobs": engine.recorder.settled, "seconds": ended - first}))


def run_loop(main: Any) -> None:
    """The worker's event loop, as `jobstream worker` runs it."""
    try:
        from jobstream.streams.loop import run  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # an engine without its own loop runner
        asyncio.run(main)
    else:
        run(main)


async def publish(prefix: str, queue: str, n: int) -> int:
    redis = aioredis.Redis.from_url(common.REDIS_URL)
    keys = common.bench_keys(prefix)
    try:
        if queue == common.NOOP_QUEUE:
            pub = Publisher(redis, keys, {common.NOOP_QUEUE: common.Noop}, record_queued=False)
            payloads: list[Any] = [common.Noop(n=j) for j in range(n)]
        else:
            pub = Publisher(redis, keys, PAYLOADS, record_queued=False)
            payloads = events(n)
        for i in range(0, n, 1000):
            await pub.publish_many(queue, payloads[i : i + 1000])
    finally:
        await redis.aclose()
    return n


async def engine_run(
    db: str, queue: str, n: int, concurrency: int | None, profile: pathlib.Path | None, tag: str
) -> float:
    """Publish N jobs of `queue`, drain them in a worker process; jobs/s. Exits on a shortfall."""
    async with common.scratch_prefix("b") as prefix:
        await publish(prefix, queue, n)
        cmd = [sys.executable, "-m", "bench.analytics", "--worker", "--db", db,
               "--prefix", prefix, "--queue", queue]  # fmt: skip
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        if profile is not None:
            spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
            out_file = profile / f"{tag}.raw"
            cmd = [spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
                   "-o", str(out_file), "--", *cmd]  # fmt: skip
        root = str(common.ROOT)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"worker for {queue} failed ({proc.returncode}): {err.decode()[-2000:]}")
        lines = [x for x in out.decode().splitlines() if x.startswith("{")]  # py-spy talks too
        if not lines:
            sys.exit(f"worker for {queue} printed no figures: {err.decode()[-2000:]}")
        figures = json.loads(lines[-1])
    if figures["jobs"] < n:
        sys.exit(f"{queue}: drained {figures['jobs']} jobs of {n} published")
    return float(figures["jobs"] / figures["seconds"])


async def check_counts(db: str, published: list[int]) -> None:
    """Every run published the same events: each stored once, each counted once a day."""
    sample = events(published[0])
    unique = {e.event_id: e for e in sample}
    expected: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for e in unique.values():
        expected[(e.occurred_at.date().isoformat(), e.mailbox_id, e.type)] += 1
    conn = await asyncpg.connect(db)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM analytics_events")
        rows = await conn.fetch("SELECT day, mailbox_id, type, count FROM analytics_daily_mailbox")
        await conn.execute("TRUNCATE analytics_events, analytics_daily_mailbox, "
                           "analytics_daily_campaign")  # fmt: skip
    finally:
        await conn.close()
    got = {(r["day"].isoformat(), r["mailbox_id"], r["type"]): r["count"] for r in rows}
    if stored != len(unique) or got != dict(expected):
        sys.exit(f"analytics: {stored} events stored of {len(unique)}, counters "
                 f"{'match' if got == dict(expected) else 'DIFFER'}")  # fmt: skip


async def hot_updates(db: str) -> str:
    """How many updates of `jobs` PostgreSQL made in place (HOT: no index touched)."""
    await asyncio.sleep(1.0)  # the workers' statistics reach the views when they exit
    conn = await asyncpg.connect(db)
    try:
        row = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
        )
    finally:
        await conn.close()
    upd, hot = int(row["n_tup_upd"]), int(row["n_tup_hot_upd"])
    share = f"{100 * hot / upd:.0f} %" if upd else "-"
    return (
        f"jobs rows updated: {upd:,}, of them HOT (in place, no index touched): {hot:,} "
        + f"({share})"
    )


async def main(n: int, repeat: int, concurrency: int | None, profile: pathlib.Path | None) -> None:
    rates: dict[str, list[float]] = {"analytics": [], "no-op": [], "plain": []}
    async with common.scratch_database() as db:
        for i in range(repeat):  # interleaved, so no side always meets a cold database
            rates["no-op"].append(
                await engine_run(db, common.NOOP_QUEUE, n, concurrency, profile, f"noop-{i}")
            )
            rates["analytics"].append(
                await engine_run(db, "analytics", n, concurrency, profile, f"analytics-{i}")
            )
            await check_counts(db, [n])
            async with common.scratch_prefix("b") as prefix:
                done, seconds = await plain_loop(db, prefix, n)
            rates["plain"].append(done / seconds)
        hot = await hot_updates(db)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"N={n}, median of {repeat} interleaved runs each, one worker process")
    for name, label in (("plain", "plain redis-py loop (same writes)"),
                        ("no-op", "engine, no-op queue (full path)"),
                        ("analytics", "engine, analytics queue")):  # fmt: skip
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"{label:<36} {med[name]:>9,.0f} jobs/s   (runs: {runs})")
    print(f"ratio no-op engine / plain loop:  {med['no-op'] / med['plain']:.2f}")
    print(f"ratio analytics / no-op engine:   {med['analytics'] / med['no-op']:.2f}")
    print(hot)
    if profile is not None:
        for raw in sorted(os.listdir(profile)):
            if raw.endswith(".raw"):
                print(f"\nprofile {raw}:")
                print(summarize(profile / raw))


def summarize(raw: pathlib.Path, top: int = 20) -> str:
    """Top functions of a py-spy raw (collapsed) profile, by own samples and by total."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or "importlib._bootstrap" in stack:
            continue  # start-up imports are not the drain
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " (" + _where(f) + ")" for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    lines = [f"{samples} samples; own = in the function itself, total = with its callees",
             f"{'own %':>6} {'total %':>7}  function"]  # fmt: skip
    for name, n in own.most_common(top):
        lines.append(f"{100 * n / samples:6.1f} {100 * total[name] / samples:7.1f}  {name}")
    return "\n".join(lines)


def _where(frame: str) -> str:
    """`file.py:line` of a py-spy frame `name (path:line)`, path shortened."""
    inner = frame.rpartition(" (")[2].rstrip(")")
    path, _, _ = inner.rpartition(":")
    parts = pathlib.PurePath(path).parts
    return "/".join(parts[-2:]) if parts else inner


if __name__ == "__main__":
    ap = common.bench_parser(__doc__)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per setting")
    ap.add_argument("--concurrency", type=int, help="override the queues' concurrency")
    ap.add_argument("--profile", type=pathlib.Path, help="py-spy each worker into this folder")
    ap.add_argument("--queue", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        run_loop(worker(a.db, a.prefix, a.queue, a.concurrency))
    else:
        if a.profile is not None:
            a.profile.mkdir(parents=True, exist_ok=True)
        asyncio.run(main(a.n, a.repeat, a.concurrency, a.profile))

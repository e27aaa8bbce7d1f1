"""`jobstream demo`: start two worker replicas and push real jobs through all six queues."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
import random
import secrets
import signal
import sys
import time

import asyncpg

from jobstream.consumers.demo.http_sink import http_sink
from jobstream.consumers.demo.mail import run_mail_demo
from jobstream.consumers.demo.smtp_sink import Sink, smtp_sink
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import AnalyticsEvent
from jobstream.streams import Status

__all__ = ["run_demo"]

_TYPES = ("sent", "delivered", "open", "click", "reply", "bounce", "unsubscribe", "complaint")
_WEIGHTS = (40, 30, 15, 6, 3, 3, 2, 1)

PROGRESS_SQL = "SELECT status, count(*) AS n FROM jobs WHERE id = ANY($1::text[]) GROUP BY status"
COUNTS_SQL = """
SELECT type, sum(count) AS n FROM analytics_daily_mailbox
WHERE mailbox_id LIKE $1 GROUP BY type ORDER BY type
"""


def _events(run: str, n: int) -> tuple[list[AnalyticsEvent], collections.Counter[str]]:
    rand = random.Random(run)
    distinct: list[AnalyticsEvent] = []
    now = dt.datetime.now(dt.UTC)
    for i in range(n):
        distinct.append(
            AnalyticsEvent(
                event_id=f"{run}-evt-{i}",
                type=rand.choices(_TYPES, _WEIGHTS)[0],  # type: ignore[arg-type]
                mailbox_id=f"{run}-mb-{rand.randrange(5)}",
                campaign_id=f"{run}-cmp-{rand.randrange(3)}" if rand.random() < 0.7 else None,
                occurred_at=now - dt.timedelta(minutes=rand.randrange(600)),
            )
        )
    expected = collections.Counter(str(e.type) for e in distinct)
    dupes = rand.sample(distinct, n // 5)  # a fifth of the events arrive twice
    events = distinct + dupes
    rand.shuffle(events)
    return events, expected


async def _spawn_workers(
    settings: Settings, n: int, extra_env: dict[str, str]
) -> list[asyncio.subprocess.Process]:
    env = {**os.environ, "JOBSTREAM_LOG_LEVEL": "ERROR", **extra_env}
    return [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jobstream.consumers.cli", "worker", "--processes", "1", env=env
        )
        for _ in range(n)
    ]


async def run_demo(settings: Settings, n_events: int = 3000) -> int:
    """Analytics events with duplicates, then mail through all six queues, on two workers."""
    run = f"demo{secrets.token_hex(3)}"
    async with contextlib.AsyncExitStack() as stack:
        try:
            sink: Sink | None = await stack.enter_async_context(smtp_sink())
        except ImportError:
            sink = None
            print("aiosmtpd is not installed (pip install -e '.[dev]'): the mail part is skipped")
        hooks = await stack.enter_async_context(http_sink())
        # The demo's endpoint and relay listen on loopback: let these workers reach them, and
        # spread a warmup day over seconds instead of hours.
        env = {"JOBSTREAM_WEBHOOK_ALLOW_PRIVATE": "true", "JOBSTREAM_WARMUP_SPREAD_S": "4"}
        print(f"demo {run}: starting 2 worker replicas")
        workers = await _spawn_workers(settings, 2, env)
        try:
            async with connect(settings) as deps:
                ok = await _analytics(deps, run, n_events)
                if sink is not None:
                    ok = await run_mail_demo(deps, f"{run}-mail", sink, hooks) and ok
                return 0 if ok else 1
        finally:
            for w in workers:
                if w.returncode is None:
                    w.send_signal(signal.SIGTERM)
            codes = [await w.wait() for w in workers]
            print(f"workers stopped (exit codes {codes})")
    return 1  # not reached: the block returns or raises


async def _analytics(deps: Deps, run: str, n_events: int) -> bool:
    """Publish analytics events (a fifth twice); check each distinct one is counted once."""
    events, expected = _events(run, n_events)
    started = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(events), 500):
        ids += await deps.publisher.publish_many("analytics", events[i : i + 500])
    print(
        f"published {len(ids)} analytics jobs ({n_events} distinct events, "
        f"{len(ids) - n_events} duplicates)"
    )
    done = await _progress(deps.pool, ids)
    took = time.perf_counter() - started
    print(f"drained {done} jobs in {took:.2f}s ({done / took:.0f} jobs/s end to end)")
    rows = await deps.pool.fetch(COUNTS_SQL, f"{run}-%")
    counted = {r["type"]: int(r["n"]) for r in rows}
    print(f"{'type':<12} {'counted':>8} {'distinct published':>19}")
    for t in _TYPES:
        print(f"{t:<12} {counted.get(t, 0):>8} {expected.get(t, 0):>19}")
    ok = counted == dict(expected)
    print("counts equal the distinct events published" if ok else "COUNTS DIFFER")
    return ok


async def _progress(pool: asyncpg.Pool, ids: list[str], timeout_s: float = 300) -> int:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        rows = await pool.fetch(PROGRESS_SQL, ids)
        by = {r["status"]: int(r["n"]) for r in rows}
        done = by.get(Status.COMPLETED, 0) + by.get(Status.FAILED, 0)
        line = f"  progress: {done}/{len(ids)} done ({by.get(Status.FAILED, 0)} failed)"
        if line != last:
            print(line, flush=True)
            last = line
        if done >= len(ids):
            return done
        await asyncio.sleep(0.5)
    raise TimeoutError(f"jobs not drained within {timeout_s}s")

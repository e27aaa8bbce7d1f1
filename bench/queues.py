"""The six real queues, each beside the no-op queue in the same run.

    python -m bench.queues --n 2000

For each queue, publishes N realistic jobs and drains them with one worker process (the
queue's real handler and policy, full path) against local sinks: an SMTP sink for
`email-sending` and `warmup`'s mailboxes, an HTTP receiver for `webhook`, the real MIME
messages of tests/data/inbound for `email:processing` and the real bounces of
tests/data/bounces* for `bounce`. The no-op queue runs first and last; its mean is the
baseline. Prints jobs/s and the ratio to no-op for each, and exits non-zero when a queue
drained fewer jobs than were published or any job failed. Follow-up jobs a handler
publishes (events, webhooks, sends) are left in their streams and deleted with the run's
keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/queues.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import base64
import datetime as dt
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import common
from jobstream.consumers.demo.http_sink import http_sink
from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.store.webhooks import add_endpoint
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import (
    PAYLOADS,
    AnalyticsEvent,
    ProcessBounce,
    ProcessEmail,
    RunWarmup,
    SendEmail,
    WebhookDelivery,
)
from jobstream.streams import Publisher

SCRIPT = Path(__file__).resolve()
DATA = common.ROOT / "tests" / "data"
QUEUES = ("analytics", "email-sending", "webhook", "warmup", "bounce", "email:processing")
EVENT_TYPES = ("sent", "delivered", "open", "click", "bounce", "reply", "unsubscribe")
SEND_MAILBOX = "mb-bench-send"
WARM_MAILBOXES = 20
PUBLISH_BATCH = 200


def _files(*folders: str) -> list[bytes]:
    found = sorted(p for f in folders for p in (DATA / f).rglob("*") if p.is_file())
    skip = {".md", ".json", ".py"}
    return [p.read_bytes() for p in found if p.suffix not in skip and "LICENSE" not in p.name]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def analytics(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    return [
        AnalyticsEvent(
            event_id=f"evt-{i}", type=rng.choice(EVENT_TYPES), mailbox_id=f"mb-{i % 50}",  # type: ignore[arg-type]
            occurred_at=now - dt.timedelta(minutes=rng.randrange(3 * 24 * 60)),
            campaign_id=f"cmp-{i % 7}", message_id=f"<out-{i}@app.example.org>",
            properties={"ua": "Mozilla/5.0", "ip": "192.0.2.1"} if i % 3 else {},
        )
        for i in range(n)
    ]  # fmt: skip


def sending(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    words = ("hello", "thanks", "offer", "meeting", "price", "schedule", "call", "next")
    return [
        SendEmail(
            mailbox_id=SEND_MAILBOX, to=[f"customer{i}@example.net"],
            subject=f"Your receipt #{i}", text=" ".join(rng.choice(words) for _ in range(300)),
            html=f"<p>Receipt {i}</p>" + "<p>line</p>" * 50, campaign_id=f"cmp-{i % 7}",
            headers={"X-Campaign": f"cmp-{i % 7}"},
        )
        for i in range(n)
    ]  # fmt: skip


def webhooks(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    return [
        WebhookDelivery(
            endpoint_id=ctx["endpoint"], message_id=f"msg_{i}", event_type="email.sent",
            timestamp=now, data={"message_id": f"<out-{i}@app.example.org>", "n": i},
        )
        for i in range(n)
    ]  # fmt: skip


def warmups(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    today = dt.datetime.now(dt.UTC).date()
    return [
        RunWarmup(mailbox_id=f"mb-warm-{i % WARM_MAILBOXES}",
                  day=today + dt.timedelta(days=i // WARM_MAILBOXES))
        for i in range(n)
    ]  # fmt: skip


def bounces(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    raws = _files("bounces", "bounces_public", "bounces_extra")
    return [ProcessBounce(raw_b64=_b64(raws[i % len(raws)]), mailbox_id=SEND_MAILBOX)
            for i in range(n)]  # fmt: skip


def inbound(n: int, rng: random.Random, ctx: dict[str, str]) -> list[Any]:
    # Real messages, each stored once per mailbox: a new mailbox for every pass over them.
    raws = _files("inbound") + _files("bounces")[:20]
    return [ProcessEmail(mailbox_id=f"mb-in-{i // len(raws)}", raw_b64=_b64(raws[i % len(raws)]))
            for i in range(n)]  # fmt: skip


WORKLOADS: dict[str, Callable[[int, random.Random, dict[str, str]], list[Any]]] = {
    "analytics": analytics,
    "email-sending": sending,
    "webhook": webhooks,
    "warmup": warmups,
    "bounce": bounces,
    "email:processing": inbound,
}


def _worker_settings(db: str, prefix: str) -> Settings:
    return common.bench_settings(db, prefix, webhook_allow_private=True)


async def worker(db: str, prefix: str, queue: str) -> None:
    settings = _worker_settings(db, prefix)
    if queue == common.NOOP_QUEUE:
        await common.burst_worker(settings, None, [common.NOOP], None)
    else:
        await common.burst_worker(settings, [queue], HANDLERS, None)


async def _setup(db: str, smtp_url: str, hook_url: str) -> dict[str, str]:
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    try:
        for i in range(-1, WARM_MAILBOXES):  # the sender, then the warmup mailboxes
            name, ident = ("sender", SEND_MAILBOX) if i < 0 else (f"warm{i}", f"mb-warm-{i}")
            await add_mailbox(
                pool, f"{name}@bench.example.org", mailbox_id=ident, smtp_url=smtp_url,
                daily_limit=10**7, per_minute_limit=10**7, warmup=i >= 0,
            )  # fmt: skip
        endpoint, _ = await add_endpoint(pool, hook_url)
    finally:
        await pool.close()
    return {"endpoint": endpoint}


async def drain(db: str, queue: str, payloads: Sequence[Any]) -> dict[str, float]:
    """Publish the payloads to `queue` under a fresh prefix, drain them, check the count."""
    async with common.scratch_prefix("q") as prefix:
        settings = _worker_settings(db, prefix)
        r = aioredis.Redis.from_url(settings.redis_url)
        try:
            keys = common.bench_keys(prefix)
            types = {common.NOOP_QUEUE: common.Noop} if queue == common.NOOP_QUEUE else PAYLOADS
            pub = Publisher(r, keys, types, record_queued=False)
            for i in range(0, len(payloads), PUBLISH_BATCH):
                await pub.publish_many(queue, payloads[i : i + PUBLISH_BATCH])
            args = ["--db", db, "--prefix", prefix, "--queue", queue]
            got = await common.run_workers(SCRIPT, args, 1, common.worker_env())
        finally:
            await r.aclose()
    common.require_drained(queue, len(payloads), int(got["done"]))
    if got["failed"]:  # a real handler refused the workload: not the path to measure
        raise common.BenchError(f"{queue}: {int(got['failed'])} of {len(payloads)} jobs failed")
    return got


async def main(n: int, noop_n: int, only: Sequence[str]) -> None:
    await common.check_servers()
    rng = random.Random(12)
    results: dict[str, dict[str, float]] = {}
    async with common.scratch_database() as db, smtp_sink() as sink, http_sink() as hooks:
        ctx = await _setup(db, sink.url(), hooks.url())
        noops = [common.Noop(n=i) for i in range(noop_n)]
        first = await drain(db, common.NOOP_QUEUE, noops)
        for queue in only:
            results[queue] = await drain(db, queue, WORKLOADS[queue](n, rng, ctx))
        last = await drain(db, common.NOOP_QUEUE, noops)
        sent, delivered = len(sink.messages), len(hooks.requests)
    noop_rates = [g["done"] / g["seconds"] for g in (first, last)]
    baseline = statistics.mean(noop_rates)
    print(f"N={n} jobs a queue, no-op {noop_n}, one worker process each, the queue's own "
          f"policy; {common.load_note()}")  # fmt: skip
    print(f"{'queue':<18} {'jobs/s':>9} {'ratio to no-op':>15} {'failed':>7}")
    print(f"{'no-op':<18} {baseline:>9,.0f} {1:>15.2f} {0:>7}   (first {noop_rates[0]:,.0f}, "
          f"last {noop_rates[1]:,.0f})")  # fmt: skip
    for queue, got in results.items():
        rate = got["done"] / got["seconds"]
        print(f"{queue:<18} {rate:>9,.0f} {rate / baseline:>15.3f} {int(got['failed']):>7}")
    print(f"SMTP sink received {sent} messages; webhook receiver {delivered} requests")


if __name__ == "__main__":
    ap = common.bench_parser(__doc__)
    ap.add_argument("--n", type=int, default=2000, help="jobs published to each queue")
    ap.add_argument("--noop-n", type=int, default=None, help="no-op jobs (max(n, 10000))")
    ap.add_argument("--queues", nargs="+", choices=QUEUES, default=list(QUEUES), metavar="Q",
                    help="the queues to measure (default: all six)")  # fmt: skip
    ap.add_argument("--queue", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        common.run_main(lambda: worker(a.db, a.prefix, a.queue))
    else:
        common.run_main(lambda: main(a.n, a.noop_n or max(a.n, 10_000), a.queues))

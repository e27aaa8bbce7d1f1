"""The `warmup` queue: plan a mailbox's warmup emails for one day and publish them.

Each planned message is an `email-sending` job to a peer mailbox, spread over the day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from jobstream.consumers.mail.inbound import WARMUP_HEADER
from jobstream.consumers.store.mailboxes import Mailbox, get_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.events import emit
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import RunWarmup, SendEmail
from jobstream.streams import Job, PermanentError, Policy
from jobstream.streams.schedules import CatchUp, Schedule, add_schedule, occurrence_of

__all__ = [
    "ALL_MAILBOXES",
    "WARMUP_SCHEDULE",
    "daily_target",
    "ensure_warmup_schedule",
    "publish_day",
    "run_warmup",
    "warmup_job_id",
]

START_SQL = """
UPDATE mailboxes SET warmup_started_on = coalesce(warmup_started_on, $2::date)
WHERE id = $1 RETURNING warmup_started_on
"""
BOUNCE_RATE_SQL = """
SELECT count(*) FILTER (WHERE status IN ('bounced', 'failed')) AS bounced, count(*) AS total
FROM outbound_messages
WHERE mailbox_id = $1 AND status IN ('sent', 'bounced', 'failed')
  AND created_at >= now() - interval '7 days'
"""
PAUSE_SQL = "UPDATE mailboxes SET warmup_enabled = false, updated_at = now() WHERE id = $1"
PEERS_SQL = """
SELECT id, address FROM mailboxes
WHERE warmup_enabled AND status = 'active' AND id <> $1 ORDER BY id
"""
TARGET_SQL = """
INSERT INTO warmup_daily AS w (mailbox_id, day, target) VALUES ($1, $2, $3)
ON CONFLICT (mailbox_id, day) DO UPDATE SET target = greatest(w.target, EXCLUDED.target)
"""
PLANNED_SQL = "SELECT count(*) FROM warmup_sends WHERE mailbox_id = $1 AND day = $2"
PLAN_SQL = """
INSERT INTO warmup_sends (mailbox_id, day, n, peer_mailbox_id, job_id)
SELECT $1, $2, t.n, t.peer, t.job_id
FROM unnest($3::int[], $4::text[], $5::text[]) AS t(n, peer, job_id)
ON CONFLICT DO NOTHING
"""
UNPUBLISHED_SQL = """
SELECT s.n, s.job_id, m.address AS peer_address
FROM warmup_sends s JOIN mailboxes m ON m.id = s.peer_mailbox_id
WHERE s.mailbox_id = $1 AND s.day = $2 AND NOT s.published ORDER BY s.n
"""
PUBLISHED_SQL = """
UPDATE warmup_sends SET published = true WHERE mailbox_id = $1 AND day = $2 AND n = ANY($3::int[])
"""

_SUBJECTS = (
    "Quick question about next week",
    "Following up on our chat",
    "Notes from today",
    "Coffee on Thursday?",
    "Re: the draft you sent",
    "Thanks for the intro",
    "Idea for the team offsite",
    "Agenda for Monday",
    "Short update",
    "Checking in",
    "Lunch plans",
    "That article I mentioned",
)
_OPENINGS = (
    "Hi {name},",
    "Hello {name},",
    "Hey {name},",
    "Good morning {name},",
)
_MIDDLES = (
    "I went through the notes from our last call and everything looks good on my side.",
    "Do you have a few minutes later this week to go over the plan?",
    "I found the article I mentioned, it is worth a read when you have time.",
    "Thanks again for your help yesterday, it made the rest of the day much easier.",
    "The team liked the idea, so let's see if we can make it happen next month.",
    "I moved our meeting to Thursday afternoon, let me know if that still works.",
    "Could you send me the latest version when you get a chance?",
    "Just wanted to share a quick update: the first part is done.",
)
_CLOSINGS = ("Best,", "Thanks,", "Cheers,", "Talk soon,", "Kind regards,")


def daily_target(settings: Settings, day_index: int, daily_limit: int = 0) -> int:
    """The ramp: `start + step * day_index` messages, capped (and under the daily limit)."""
    if day_index < 0:
        return 0
    target = settings.warmup_start_per_day + settings.warmup_step_per_day * day_index
    target = min(target, settings.warmup_max_per_day)
    return min(target, daily_limit) if daily_limit > 0 else target


def warmup_job_id(mailbox_id: str, day: dt.date, n: int) -> str:
    """The job id of the mailbox's `n`-th warmup message of `day`: the same on every run."""
    ref = mailbox_id if len(mailbox_id) <= 150 else hashlib.sha256(mailbox_id.encode()).hexdigest()
    return f"warmup:{ref}:{day.isoformat()}:{n}"


def _content(mailbox: Mailbox, peer_address: str, day: dt.date, n: int) -> tuple[str, str]:
    rand = random.Random(f"{mailbox.id}|{day}|{n}")
    name = peer_address.partition("@")[0].split(".")[0].split("+")[0].capitalize()
    signature = (mailbox.display_name or mailbox.address.partition("@")[0]).split()[0]
    middle = rand.sample(_MIDDLES, 2)
    body = "\n\n".join(
        [
            rand.choice(_OPENINGS).format(name=name),
            " ".join(middle),
            f"{rand.choice(_CLOSINGS)}\n{signature}",
        ]
    )
    return rand.choice(_SUBJECTS), body + "\n"


def _window(settings: Settings, day: dt.date, now: float) -> tuple[float, float]:
    """The span (epoch seconds) to spread the day's messages over."""
    day_start = dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()
    start = max(now, day_start)
    if settings.warmup_spread_s is not None:
        return start, start + settings.warmup_spread_s
    return start, max(day_start + 86_400 - 600, start + 60)  # the last minutes: for retries


@handler("warmup", RunWarmup, Policy(max_attempts=5, timeout_s=60, concurrency=8))
async def run_warmup(msg: RunWarmup, job: Job, deps: Deps) -> dict[str, Any]:
    """Plan the day's warmup messages up to the ramp's target and publish them.

    Idempotent per mailbox and day: planned messages are rows of `warmup_sends` keyed by
    (mailbox, day, n) with deterministic job ids, so a second run plans nothing new and
    only publishes what a crashed run left unpublished. The mailbox `*` (the daily
    schedule's job) publishes this job for every enabled mailbox instead.
    """
    if msg.mailbox_id == ALL_MAILBOXES:
        day = day_of(msg, job)
        ids = await publish_day(deps, day)
        return {"status": "published", "day": day.isoformat(), "mailboxes": len(ids)}
    day = msg.day or dt.datetime.now(dt.UTC).date()
    mailbox = await get_mailbox(deps.pool, msg.mailbox_id)
    if mailbox is None:
        raise PermanentError(f"no mailbox {msg.mailbox_id}")
    if not mailbox.warmup_enabled or mailbox.status != "active":
        return {"status": "skipped", "reason": "warmup disabled or mailbox paused"}
    paused = await _pause_if_bouncing(deps, mailbox, day)
    if paused is not None:
        return paused
    started: dt.date = await deps.pool.fetchval(START_SQL, mailbox.id, day)
    target = daily_target(deps.settings, (day - started).days, mailbox.daily_limit)
    await deps.pool.execute(TARGET_SQL, mailbox.id, day, target)
    peers = [(r["id"], r["address"]) for r in await deps.pool.fetch(PEERS_SQL, mailbox.id)]
    before = int(await deps.pool.fetchval(PLANNED_SQL, mailbox.id, day))
    if not peers:
        return {"status": "no_peers", "day": day.isoformat(), "target": target}
    await _plan(deps.pool, mailbox, day, target, before, peers)
    published = await _publish(deps, mailbox, day)
    return {
        "status": "planned",
        "day": day.isoformat(),
        "target": target,
        "already_planned": before,
        "published": published,
    }


async def _pause_if_bouncing(deps: Deps, mailbox: Mailbox, day: dt.date) -> dict[str, Any] | None:
    """Pause the mailbox's warmup when its recent bounce rate is over the threshold."""
    row = await deps.pool.fetchrow(BOUNCE_RATE_SQL, mailbox.id)
    bounced, total = (int(row["bounced"]), int(row["total"])) if row else (0, 0)
    s = deps.settings
    if total < s.warmup_min_sample or bounced / total <= s.warmup_max_bounce_rate:
        return None
    rate = round(bounced / total, 4)
    data = {"mailbox_id": mailbox.id, "bounce_rate": rate, "sample": total}
    data["threshold"] = s.warmup_max_bounce_rate
    # Emit first: it is idempotent by key, so a retry after a failure in between re-emits
    # the same event instead of finding warmup already off and saying nothing.
    await emit(deps, "mailbox.warmup_paused", data, key=f"warmup-paused:{mailbox.id}:{day}")
    await deps.pool.execute(PAUSE_SQL, mailbox.id)
    return {"status": "paused", **data}


async def _plan(
    pool: asyncpg.Pool,
    mailbox: Mailbox,
    day: dt.date,
    target: int,
    before: int,
    peers: list[tuple[str, str]],
) -> None:
    """Add rows n = before .. target-1, round-robin over the peers from a per-day offset."""
    if target <= before:
        return
    offset = int(hashlib.sha256(f"{mailbox.id}|{day}".encode()).hexdigest(), 16) % len(peers)
    ns = list(range(before, target))
    chosen = [peers[(offset + n) % len(peers)][0] for n in ns]
    ids = [warmup_job_id(mailbox.id, day, n) for n in ns]
    await pool.execute(PLAN_SQL, mailbox.id, day, ns, chosen, ids)


async def _publish(deps: Deps, mailbox: Mailbox, day: dt.date) -> int:
    """Publish the unpublished planned messages, each at its own point of the window."""
    rows = await deps.pool.fetch(UNPUBLISHED_SQL, mailbox.id, day)
    if not rows:
        return 0
    now = time.time()
    start, end = _window(deps.settings, day, now)
    step = (end - start) / len(rows)
    rand = random.Random(f"{mailbox.id}|{day}|delays")
    header = {WARMUP_HEADER: f"{mailbox.id}:{day.isoformat()}"}
    for i, row in enumerate(rows):
        subject, text = _content(mailbox, row["peer_address"], day, row["n"])
        payload = SendEmail(
            mailbox_id=mailbox.id,
            to=[row["peer_address"]],
            subject=subject,
            text=text,
            headers=header,
        )
        delay = start - now + step * (i + rand.uniform(0.1, 0.9))
        await deps.publisher.publish("email-sending", payload, row["job_id"], delay_s=delay)
    await deps.pool.execute(PUBLISHED_SQL, mailbox.id, day, [r["n"] for r in rows])
    return len(rows)


# ---- the daily run: one schedule, created by `jobstream migrate`, whose job publishes the
# day's `warmup` job of every enabled mailbox (`jobstream warmup schedule` does it by hand)

ALL_MAILBOXES = "*"
"""The `mailbox_id` of a `warmup` job that publishes one job per enabled mailbox."""
WARMUP_SCHEDULE = "warmup-daily"
ENABLED_SQL = "SELECT id FROM mailboxes WHERE warmup_enabled AND status = 'active' ORDER BY id"


async def ensure_warmup_schedule(conn: asyncpg.Connection) -> bool:
    """Create the daily warmup schedule (00:00 UTC) unless it exists; True if created.

    Mailboxes carry no time zone, so the day is the UTC day for all of them. Pause it
    (`jobstream schedule pause warmup-daily`) to stop it: a removed one comes back with
    the next `migrate`.
    """
    schedule = Schedule(
        name=WARMUP_SCHEDULE,
        queue="warmup",
        payload=f'{{"mailbox_id":"{ALL_MAILBOXES}"}}',
        cron="0 0 * * *",
        tz="UTC",
        catch_up=CatchUp.LATEST,
    )
    return await add_schedule(conn, schedule)


async def publish_day(
    deps: Deps,
    day: dt.date | None = None,
    *,
    chunk: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Publish one `warmup` job per enabled mailbox for `day` (default: today, UTC),
    `chunk` per round trip, telling `progress(published, total)` before the first and
    after each; the job ids are per mailbox and day, so a day published twice plans
    nothing twice."""
    when = day or dt.datetime.now(dt.UTC).date()
    ids = [r["id"] for r in await deps.pool.fetch(ENABLED_SQL)]
    published: list[str] = []
    if progress is not None:
        progress(0, len(ids))
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        jobs = [RunWarmup(mailbox_id=m, day=when) for m in part]
        job_ids = [f"warmup-day:{m[:150]}:{when.isoformat()}" for m in part]
        published += await deps.publisher.publish_many("warmup", jobs, job_ids)
        if progress is not None:
            progress(len(published), len(ids))
    return published


def day_of(msg: RunWarmup, job: Job) -> dt.date:
    """The day a fan-out job is for: its payload's, else its schedule occurrence's, else
    today (UTC)."""
    if msg.day is not None:
        return msg.day
    occurrence = occurrence_of(job.id)
    return (occurrence or dt.datetime.now(dt.UTC)).date()

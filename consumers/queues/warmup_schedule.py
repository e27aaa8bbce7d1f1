"""The warmup queue's daily run: one schedule, created by `jobstream migrate`, whose job
publishes the day's `warmup` job of every enabled mailbox (`warmup schedule` does the same
by hand)."""

from __future__ import annotations

import datetime as dt

import asyncpg

from jobstream.consumers.worker.deps import Deps
from jobstream.schema.payloads import RunWarmup
from jobstream.streams import Job
from jobstream.streams.schedules import CatchUp, Schedule, add_schedule, occurrence_of

__all__ = ["ALL_MAILBOXES", "WARMUP_SCHEDULE", "ensure_warmup_schedule", "publish_day"]

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


async def publish_day(deps: Deps, day: dt.date | None = None) -> list[str]:
    """Publish one `warmup` job per enabled mailbox for `day` (default: today, UTC); the
    job ids are per mailbox and day, so a day published twice plans nothing twice."""
    when = day or dt.datetime.now(dt.UTC).date()
    ids = [r["id"] for r in await deps.pool.fetch(ENABLED_SQL)]
    jobs = [RunWarmup(mailbox_id=i, day=when) for i in ids]
    job_ids = [f"warmup-day:{i[:150]}:{when.isoformat()}" for i in ids]
    return await deps.publisher.publish_many("warmup", jobs, job_ids) if jobs else []


def day_of(msg: RunWarmup, job: Job) -> dt.date:
    """The day a fan-out job is for: its payload's, else its schedule occurrence's, else
    today (UTC)."""
    if msg.day is not None:
        return msg.day
    occurrence = occurrence_of(job.id)
    return (occurrence or dt.datetime.now(dt.UTC)).date()

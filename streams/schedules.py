"""Recurring schedules: their definitions in PostgreSQL and when their occurrences fall.

A schedule runs every N seconds (occurrences at whole multiples of N since the epoch) or
on a cron expression read by `cronsim` in a `zoneinfo` time zone, with daylight-saving
transitions as Debian's cron has them (cronsim's documented behaviour). Each occurrence
is one job with the deterministic id `sched:<name>:<occurrence in UTC>`.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import zoneinfo
from collections.abc import Iterator

import asyncpg
import msgspec
from cronsim import CronSim, CronSimError

from jobstream.streams.errors import ConfigError

__all__ = [
    "CatchUp",
    "Schedule",
    "add_schedule",
    "check_schedule",
    "due_occurrences",
    "first_after",
    "list_schedules",
    "occurrence_id",
    "occurrence_of",
    "remove_schedule",
    "set_paused",
]

_NAME = re.compile(r"[A-Za-z0-9._@/+-][A-Za-z0-9._@/+:-]{0,99}")
_ID = re.compile(r"sched:(.+):(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class CatchUp(enum.StrEnum):
    """What is published for occurrences missed while no replica ran (older than the grace)."""

    LATEST = "latest"  # one run for all of them: the most recent (unless one is on time)
    ALL = "all"  # every one, oldest first
    NONE = "none"  # none: the schedule resumes with the next occurrence


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One schedule as PostgreSQL holds it."""

    name: str
    queue: str
    payload: str
    """The payload of every occurrence's job, as JSON."""
    cron: str | None = None
    every_s: int | None = None
    tz: str = "UTC"
    catch_up: CatchUp = CatchUp.LATEST
    paused: bool = False
    next_run_at: dt.datetime | None = None
    """The first occurrence not known to be published (or skipped)."""
    last_run_at: dt.datetime | None = None
    last_job_id: str | None = None


def occurrence_id(name: str, when: dt.datetime) -> str:
    """The job id of a schedule's occurrence: `sched:<name>:<YYYY-MM-DDTHH:MM:SSZ>`."""
    return f"sched:{name}:{when.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


def occurrence_of(job_id: str) -> dt.datetime | None:
    """The occurrence time (UTC) a scheduled job's id names; None for other ids."""
    match = _ID.fullmatch(job_id)
    if match is None:
        return None
    return dt.datetime.strptime(match[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _zone(tz: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {tz!r} (an IANA name such as Europe/Paris)") from None


def check_schedule(s: Schedule) -> None:
    """Raise ConfigError, one line, for a schedule that cannot run."""
    if not _NAME.fullmatch(s.name):
        raise ConfigError(
            f"invalid schedule name {s.name!r}: 1-100 letters, digits and ._@/+:- "
            "(not starting with :)"
        )
    if (s.cron is None) == (s.every_s is None):
        raise ConfigError("a schedule needs exactly one of --cron and --every")
    if s.every_s is not None:
        if not 1 <= s.every_s <= 366 * 86400:
            raise ConfigError(f"--every {s.every_s}: use 1 to 31622400 seconds")
        if s.tz != "UTC":
            raise ConfigError("--tz applies to --cron schedules only")
        return
    zone = _zone(s.tz)
    try:
        next(CronSim(s.cron or "", dt.datetime.now(zone)))
    except CronSimError as exc:
        raise ConfigError(f"invalid cron expression {s.cron!r}: {exc}") from None
    except StopIteration:
        raise ConfigError(f"cron expression {s.cron!r} never matches") from None


def first_after(s: Schedule, after: dt.datetime) -> dt.datetime | None:
    """The schedule's first occurrence strictly after `after` (UTC), or None if none."""
    if s.every_s is not None:
        n = int((after - _EPOCH).total_seconds() // s.every_s) + 1
        return _EPOCH + dt.timedelta(seconds=n * s.every_s)
    zone = _zone(s.tz)
    try:
        return next(CronSim(s.cron or "", after.astimezone(zone))).astimezone(dt.UTC)
    except StopIteration:
        return None


def first_at_or_after(s: Schedule, at: dt.datetime) -> dt.datetime | None:
    """The schedule's first occurrence at `at` or later (UTC)."""
    return first_after(s, at - dt.timedelta(microseconds=1))


def _occurrences(s: Schedule, start: dt.datetime, end: dt.datetime) -> Iterator[dt.datetime]:
    """The occurrences from `start` (inclusive) to `end` (inclusive), oldest first."""
    when = first_at_or_after(s, start)
    while when is not None and when <= end:
        yield when
        when = first_after(s, when)


def _latest_at_or_before(s: Schedule, at: dt.datetime) -> dt.datetime | None:
    if s.every_s is not None:
        n = int((at - _EPOCH).total_seconds() // s.every_s)
        return _EPOCH + dt.timedelta(seconds=n * s.every_s)
    zone = _zone(s.tz)
    try:
        start = (at + dt.timedelta(seconds=1)).astimezone(zone)
        return next(CronSim(s.cron or "", start, reverse=True)).astimezone(dt.UTC)
    except StopIteration:
        return None


def due_occurrences(
    s: Schedule, now: dt.datetime, grace_s: float, most: int = 1000
) -> tuple[list[dt.datetime], dt.datetime]:
    """What to publish now, oldest first, and the occurrence to resume from after it.

    Occurrences from `next_run_at` up to `grace_s` before `now` are on time and always
    published; older ones were missed (no replica ran) and follow the catch-up policy.
    At most `most` are returned; the rest come on the next call.
    """
    start = s.next_run_at or now
    cutoff = now - dt.timedelta(seconds=grace_s)
    plan: list[dt.datetime] = []
    if start < cutoff:  # missed occurrences
        if s.catch_up is CatchUp.ALL:
            for when in _occurrences(s, start, cutoff):
                plan.append(when)
                if len(plan) >= most:
                    return plan, first_after(s, when) or when
        elif s.catch_up is CatchUp.LATEST:
            latest = _latest_at_or_before(s, cutoff)
            if latest is not None and latest >= start:
                plan.append(latest)
        start = cutoff + dt.timedelta(microseconds=1)
    on_time = list(_occurrences(s, start, now))
    if on_time and s.catch_up is CatchUp.LATEST and plan:
        plan = []  # the missed ones collapse into this on-time run
    plan += on_time[:most]
    resume = first_after(s, plan[-1] if plan else now) if plan else first_at_or_after(s, start)
    return plan, resume or (plan[-1] if plan else now)


# ---- PostgreSQL ----------------------------------------------------------------------

ADD_SQL = """
INSERT INTO schedules (name, queue, payload, cron, every_s, tz, catch_up, paused, next_run_at)
VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""
LIST_SQL = """
SELECT name, queue, payload::text AS payload, cron, every_s, tz, catch_up, paused,
       next_run_at, last_run_at, last_job_id
FROM schedules ORDER BY name
"""
PAUSE_SQL = "UPDATE schedules SET paused = true, updated_at = now() WHERE name = $1 RETURNING name"
RESUME_SQL = """
UPDATE schedules SET paused = false, next_run_at = $2, updated_at = now()
WHERE name = $1 RETURNING name
"""
REMOVE_SQL = "DELETE FROM schedules WHERE name = $1 RETURNING queue"


def _from_row(row: asyncpg.Record) -> Schedule:
    return Schedule(
        name=row["name"],
        queue=row["queue"],
        payload=row["payload"],
        cron=row["cron"],
        every_s=row["every_s"],
        tz=row["tz"],
        catch_up=CatchUp(row["catch_up"]),
        paused=row["paused"],
        next_run_at=row["next_run_at"],
        last_run_at=row["last_run_at"],
        last_job_id=row["last_job_id"],
    )


async def add_schedule(
    pool: asyncpg.Pool | asyncpg.Connection, s: Schedule, now: dt.datetime | None = None
) -> bool:
    """Create the schedule from its next occurrence on; False when the name is taken."""
    check_schedule(s)
    start = first_at_or_after(s, now or dt.datetime.now(dt.UTC))
    if start is None:
        raise ConfigError(f"schedule {s.name} has no occurrence to come")
    name = await pool.fetchval(
        ADD_SQL, s.name, s.queue, s.payload, s.cron, s.every_s, s.tz, s.catch_up.value,
        s.paused, start,
    )  # fmt: skip
    return name is not None


async def list_schedules(pool: asyncpg.Pool | asyncpg.Connection) -> list[Schedule]:
    return [_from_row(row) for row in await pool.fetch(LIST_SQL)]


async def set_paused(pool: asyncpg.Pool, name: str, paused: bool) -> bool:
    """Pause or resume; False when there is no such schedule. Occurrences that fell while
    it was paused are not owed: a resumed schedule starts from its next occurrence."""
    if paused:
        return await pool.fetchval(PAUSE_SQL, name) is not None
    found = [s for s in await list_schedules(pool) if s.name == name]
    if not found:
        return False
    start = first_at_or_after(found[0], dt.datetime.now(dt.UTC))
    return await pool.fetchval(RESUME_SQL, name, start) is not None


async def remove_schedule(pool: asyncpg.Pool, name: str) -> str | None:
    """Delete the schedule; its queue, or None when there was none."""
    queue: str | None = await pool.fetchval(REMOVE_SQL, name)
    return queue

"""What the dashboard shows and does, as typed records; the pages and the API share it.

It reuses the operator queries of `jobstream.consumers.cli.ops` and the dead-letter functions of
`streams` (one home per fact) and adds only what the command line has no use for: a
keyset-paged job list, throughput per minute, and each worker's pending entries.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import msgspec

from jobstream.consumers.cli import ops
from jobstream.consumers.dashboard import models as m
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.registry import by_queue
from jobstream.otel.redact import scrub
from jobstream.schema.envelope import job_id_problem
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import (
    ConfigError,
    Status,
    check_queue_name,
    list_dead,
    purge_dead,
    read_dead,
    replay_dead,
)
from jobstream.streams.dead_letters import count_dead as count_dead_letters

__all__ = [
    "PAGE_SIZE",
    "ListError",
    "Unknown",
    "all_queues",
    "count_dead",
    "dead_letter",
    "dead_page",
    "job_detail",
    "jobs_page",
    "known_queues",
    "names_a_job",
    "purge",
    "queues_page",
    "replay",
    "scrubbed",
]

PAGE_SIZE = 50
WINDOW_S = 300  # jobs/s is measured over the last five minutes
_DEAD_ID = re.compile(m.DEAD_ID_PATTERN)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NEWEST = dt.datetime.max.replace(tzinfo=dt.UTC)

# Attempts finished per queue and minute over the last hour (job_executions_finished_idx).
THROUGHPUT_SQL = """
SELECT j.queue, date_trunc('minute', e.finished_at) AS minute,
       count(*) FILTER (WHERE e.outcome = 'completed') AS completed,
       count(*) FILTER (WHERE e.outcome = 'retrying') AS retried,
       count(*) FILTER (WHERE e.outcome = 'failed') AS failed
FROM job_executions e JOIN jobs j ON j.id = e.job_id
WHERE e.finished_at > now() - interval '1 hour'
GROUP BY 1, 2
"""
# The queues that have rows: a skip scan over the index leading with `queue`.
JOB_QUEUES_SQL = """
WITH RECURSIVE q(queue) AS (
    (SELECT queue FROM jobs ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT queue FROM jobs WHERE queue > q.queue ORDER BY queue LIMIT 1)
    FROM q WHERE q.queue IS NOT NULL
)
SELECT queue FROM q WHERE queue IS NOT NULL
"""
_SUMMARY = (
    "id, queue, status, attempts, left(error, 200) AS error, created_at, updated_at, trace_id"
)
# Newest first, keyset-paged on (created_at, id): one backward index scan per queue
# (jobs_queue_created_idx, jobs_queue_status_created_idx), merged, so a page costs the
# same on the millionth row as on the first.
JOBS_PAGE_SQL = f"""
SELECT j.* FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL (
    SELECT {_SUMMARY} FROM jobs
    WHERE queue = q.name AND (created_at, id) < ($2, $3)
    ORDER BY created_at DESC, id DESC LIMIT $4
) AS j
ORDER BY j.created_at DESC, j.id DESC LIMIT $4
"""
JOBS_PAGE_BY_STATUS_SQL = f"""
SELECT j.* FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL (
    SELECT {_SUMMARY} FROM jobs
    WHERE queue = q.name AND status = $5 AND (created_at, id) < ($2, $3)
    ORDER BY created_at DESC, id DESC LIMIT $4
) AS j
ORDER BY j.created_at DESC, j.id DESC LIMIT $4
"""
JOB_BY_ID_SQL = f"SELECT {_SUMMARY} FROM jobs WHERE id = $1"


class ListError(ConfigError):
    """A request the dashboard cannot answer as asked (a malformed cursor or id)."""


class Unknown(ListError):
    """A request naming a queue that has neither a payload nor dead letters."""


def names_a_job(job_id: str) -> bool:
    """Whether `job_id` could name a job (else no store can hold it, and none is asked)."""
    return bool(job_id) and job_id_problem(job_id) is None and _encodes(job_id)


def known_queues() -> list[str]:
    return sorted(set(PAYLOADS) | set(by_queue()))


async def all_queues(deps: Deps) -> list[str]:
    """The configured queues and those with rows (e.g. no longer configured)."""
    recorded = {r["queue"] for r in await deps.pool.fetch(JOB_QUEUES_SQL)}
    return sorted(set(known_queues()) | recorded)


def scrubbed(value: Any) -> Any:
    """`value` with every remembered secret replaced in each of its strings."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value


async def _throughput(deps: Deps) -> dict[str, list[m.ChartPoint]]:
    out: dict[str, list[m.ChartPoint]] = {}
    for row in await deps.pool.fetch(THROUGHPUT_SQL):
        point = m.ChartPoint(
            minute=row["minute"],
            completed=row["completed"],
            retried=row["retried"],
            failed=row["failed"],
        )
        out.setdefault(row["queue"], []).append(point)
    for points in out.values():
        points.sort(key=lambda p: p.minute)
    return out


async def queues_page(deps: Deps) -> m.QueuesPage:
    """Per queue: what `jobstream status` shows, jobs/s lately and the last hour by minute."""
    status = await ops.queue_status(deps)
    chart = await _throughput(deps)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=WINDOW_S)
    queues = []
    for info in status:
        points = chart.get(info["queue"], [])
        recent = sum(p.completed + p.retried + p.failed for p in points if p.minute >= since)
        queues.append(
            msgspec.convert(
                {**info, "jobs_per_s": round(recent / WINDOW_S, 2), "chart": points},
                m.QueueInfo,
                from_attributes=True,
            )
        )
    return m.QueuesPage(window_s=WINDOW_S, queues=queues)


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _cursor(row: Any) -> str:
    us = (row["created_at"] - _EPOCH) // dt.timedelta(microseconds=1)
    return f"{us}~{row['id']}"


def _parse_cursor(cursor: str) -> tuple[dt.datetime, str]:
    us, sep, job_id = cursor.partition("~")
    if not sep or not us.isdigit() or len(us) > 18 or not _encodes(job_id):
        raise ListError("invalid cursor: pass the `next` value of the previous page")
    try:
        return _EPOCH + dt.timedelta(microseconds=int(us)), job_id
    except OverflowError:  # past any time a row holds: everything is older
        return _NEWEST, ""


def _check_filters(queue: str | None, status: str | None) -> None:
    if status is not None and status not in {s.value for s in Status}:
        raise ListError(f"unknown status {status!r} (known: {', '.join(s.value for s in Status)})")


async def jobs_page(
    deps: Deps,
    *,
    queue: str | None = None,
    status: str | None = None,
    job_id: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
) -> m.JobsPage:
    """Jobs newest first, filtered by queue and status, `limit` at a time after `before`;
    with `job_id`, that one job (if it has a row)."""
    _check_filters(queue, status)
    if not 1 <= limit <= 500:
        raise ListError("limit must be from 1 to 500")
    at, after_id = _parse_cursor(before) if before is not None else (_NEWEST, "")
    if job_id is not None:
        found = await deps.pool.fetchrow(JOB_BY_ID_SQL, job_id) if names_a_job(job_id) else None
        rows = [found] if found is not None else []
        rows = [r for r in rows if queue in (None, r["queue"]) and status in (None, r["status"])]
        return m.JobsPage(jobs=[_summary(r) for r in rows], next=None)
    # Any queue name: one no longer configured may have rows, and a name that cannot
    # exist has none.
    queues = await all_queues(deps) if queue is None else [queue]
    if not all(_encodes(name) for name in queues):
        return m.JobsPage(jobs=[], next=None)
    if status is None:
        rows = await deps.pool.fetch(JOBS_PAGE_SQL, queues, at, after_id, limit + 1)
    else:
        rows = await deps.pool.fetch(
            JOBS_PAGE_BY_STATUS_SQL, queues, at, after_id, limit + 1, status
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return m.JobsPage(
        jobs=[_summary(r) for r in rows], next=_cursor(rows[-1]) if more and rows else None
    )


def _summary(row: Any) -> m.JobSummary:
    return m.JobSummary(**scrubbed(dict(row)))


async def job_detail(deps: Deps, job_id: str) -> m.JobDetail | None:
    """The job's row, executions, hash and waiting entries (`ops.job_info`), and its trace."""
    if not names_a_job(job_id):
        return None
    await ops.remember_relays(deps)
    info = await ops.job_info(deps, job_id)
    if info is None or not (info["job"] or info["hash"] or info["waiting"]):
        return None
    job = info["job"]
    if job is not None:
        job = {k: v for k, v in job.items() if k != "fence"}
        for key in ("payload", "result"):
            if isinstance(job.get(key), str):
                job[key] = msgspec.json.decode(job[key])
    trace_id = (job or {}).get("trace_id")
    template = deps.settings.trace_url
    detail = {
        **info,
        "job": job,
        "trace_id": trace_id,
        "trace_url": template.replace("{trace_id}", trace_id) if template and trace_id else None,
    }
    return msgspec.convert(scrubbed(detail), m.JobDetail, from_attributes=True)


def _check_dead_ids(ids: list[str]) -> None:
    bad = [i for i in ids if not _DEAD_ID.fullmatch(i)]
    if bad:
        raise ListError(f"invalid dead-letter id {bad[0][:40]!r}: ids look like 1764496800000-0")


def _check_queue_name(queue: str) -> None:
    try:
        check_queue_name(queue)
    except ConfigError as exc:
        raise ListError(str(exc)) from None


async def _dead_queue(deps: Deps, queue: str) -> None:
    """Refuse a queue that has neither a payload nor dead letters."""
    queues = await ops.dead_queues(deps)
    if queue not in queues:
        _check_queue_name(queue)
        raise Unknown(f"unknown queue {queue!r} (known: {', '.join(queues)})")


async def dead_page(
    deps: Deps, queue: str | None = None, before: str | None = None, limit: int = PAGE_SIZE
) -> m.DeadPage:
    """Dead letters per queue; the letters of `queue` (default: the first that has any)
    newest first, `limit` at a time, older than the id `before`."""
    await ops.remember_relays(deps)
    queues = await ops.dead_queues(deps)
    if queue is not None and queue not in queues:  # e.g. just purged: none left
        _check_queue_name(queue)
        queues.append(queue)
    if before is not None:
        _check_dead_ids([before])
    if not 1 <= limit <= 500:
        raise ListError("limit must be from 1 to 500")
    pipe: Any = deps.redis.pipeline(transaction=False)  # one round trip for every queue
    for q in queues:
        pipe.xlen(deps.keys.dead(q))
    lengths: list[Any] = await pipe.execute() if queues else []
    counts = [m.DeadQueue(queue=q, count=int(n)) for q, n in zip(queues, lengths, strict=True)]
    if queue is None:
        queue = next((c.queue for c in counts if c.count), None)
    letters = []
    if queue is not None:
        letters = await list_dead(deps.redis, deps.keys, queue, limit + 1, before)
    more = len(letters) > limit
    letters = letters[:limit]
    return m.DeadPage(
        queues=counts,
        queue=queue,
        letters=[
            m.DeadLetterSummary(
                dead_id=d.dead_id,
                queue=d.queue,
                job_id=scrub(d.fields.get("job_id", "")) or None,
                reason=d.fields.get("reason"),
                attempts=d.fields.get("attempts"),
                failed_at=d.fields.get("failed_at"),
                error=scrub(d.fields.get("error", "")[:200]) or None,
                replayable=d.cut is None,
            )
            for d in letters
        ],
        next=letters[-1].dead_id if more and letters else None,
    )


async def dead_letter(deps: Deps, queue: str, dead_id: str) -> m.DeadLetterDetail | None:
    """One dead letter with all its fields, or None."""
    _check_dead_ids([dead_id])
    await _dead_queue(deps, queue)
    await ops.remember_relays(deps)
    found = await read_dead(deps.redis, deps.keys, queue, dead_id)
    if found is None:
        return None
    return m.DeadLetterDetail(
        dead_id=found.dead_id,
        queue=queue,
        fields=scrubbed(found.fields),
        replayable=found.cut is None,
        why_not=found.cut,
    )


async def replay(deps: Deps, queue: str, ids: list[str]) -> m.ReplayResult:
    """Replay each letter named (`streams.replay_dead`: publish with attempt 1, record
    `queued`, delete the letter, atomically); say which were gone or refused."""
    await _dead_queue(deps, queue)
    _check_dead_ids(ids)
    if not ids or len(ids) > 1000:
        raise ListError("name from 1 to 1000 dead letters to replay")
    replayed, gone, refused = [], [], []
    for dead_id in dict.fromkeys(ids):
        letter = await read_dead(deps.redis, deps.keys, queue, dead_id)
        if letter is None:
            gone.append(dead_id)
        elif letter.cut is not None:
            refused.append(m.Refused(dead_id=dead_id, why=letter.cut))
        else:
            entry = await replay_dead(deps.redis, deps.pool, deps.keys, letter)
            if entry is None:
                gone.append(dead_id)
            else:
                job_id = letter.fields.get("job_id")
                replayed.append(m.Replayed(dead_id=dead_id, entry_id=entry, job_id=job_id))
    return m.ReplayResult(replayed=replayed, gone=gone, refused=refused)


async def purge(deps: Deps, queue: str, older_than_ms: int | None) -> m.PurgeResult:
    """Delete a queue's dead letters for good (`streams.purge_dead`)."""
    await _dead_queue(deps, queue)
    return m.PurgeResult(purged=await purge_dead(deps.redis, deps.keys, queue, older_than_ms))


async def count_dead(deps: Deps, queue: str, older_than_ms: int | None) -> int:
    """How many letters `purge` with the same arguments would delete now."""
    await _dead_queue(deps, queue)
    return await count_dead_letters(deps.redis, deps.keys, queue, older_than_ms)

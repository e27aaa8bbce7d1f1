"""Operator queries: per-queue status, one job's whole story, health."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.exceptions

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.health import read_report
from jobstream.consumers.worker.registry import by_queue
from jobstream.schema.payloads import PAYLOADS
from jobstream.schema.text import as_text
from jobstream.schema.times import entry_ms
from jobstream.streams.lookup import find_waiting

__all__ = ["health", "job_info", "queue_status"]

COUNTS_SQL = "SELECT queue, status, count(*) AS n FROM jobs GROUP BY queue, status"
JOB_SQL = "SELECT * FROM jobs WHERE id = $1"
EXECUTIONS_SQL = (
    "SELECT attempt, outcome, error, duration_ms, worker_id, started_at, finished_at "
    "FROM job_executions WHERE job_id = $1 ORDER BY started_at, id"
)


async def _stream_info(deps: Deps, queue: str) -> dict[str, Any]:
    r, keys, group = deps.redis, deps.keys, deps.settings.group
    stream = keys.stream(queue)
    info: dict[str, Any] = {
        "queue": queue,
        "handled": queue in by_queue(),
        "length": int(await r.xlen(stream)),
        "pending": 0,
        "lag": 0,
        "consumers": 0,
        "oldest_pending_age_s": None,
        "delayed": int(await r.zcard(keys.delayed(queue))),
        "dead": int(await r.xlen(keys.dead(queue))),
    }
    try:
        groups = await r.xinfo_groups(stream)
    except redis.exceptions.ResponseError:  # no such stream yet
        return info
    for g in groups:
        if as_text(g["name"]) != group:
            continue
        info.update(
            pending=int(g["pending"]), lag=int(g.get("lag") or 0), consumers=int(g["consumers"])
        )
        if info["pending"]:
            oldest = await r.xpending_range(stream, group, min="-", max="+", count=1)
            if oldest:
                ms = entry_ms(as_text(oldest[0]["message_id"]))
                info["oldest_pending_age_s"] = round(time.time() - ms / 1000, 1)
    return info


async def queue_status(deps: Deps) -> list[dict[str, Any]]:
    """Per queue: stream length, pending, lag, consumers, oldest pending age, counts by status."""
    counts: dict[str, dict[str, int]] = {}
    for row in await deps.pool.fetch(COUNTS_SQL):
        counts.setdefault(row["queue"], {})[row["status"]] = row["n"]
    out = []
    for queue in sorted(set(PAYLOADS) | set(by_queue()) | set(counts)):
        info = await _stream_info(deps, queue)
        info["jobs"] = counts.get(queue, {})
        out.append(info)
    return out


async def job_info(deps: Deps, job_id: str, scan_limit: int = 50_000) -> dict[str, Any] | None:
    """The job's row, its executions, its hash, and where it waits when no worker has run it
    yet (a stream or delayed set of a known queue); None when nothing knows it.

    `complete` is false when a stream or delayed set longer than `scan_limit` was read only
    in part (then the answer may be empty rather than None).
    """
    row = await deps.pool.fetchrow(JOB_SQL, job_id)
    execs = await deps.pool.fetch(EXECUTIONS_SQL, job_id)
    hashed = await deps.redis.hgetall(deps.keys.job(job_id))
    waiting, complete = [], True
    if row is None:  # published by any producer, not yet recorded by a worker
        queues = sorted(set(PAYLOADS) | set(by_queue()))
        found, complete = await find_waiting(deps.redis, deps.keys, queues, job_id, scan_limit)
        waiting = [msgspec.to_builtins(w) for w in found]
    if row is None and not hashed and not waiting and complete:
        return None
    return {
        "job": dict(row) if row is not None else None,
        "executions": [dict(e) for e in execs],
        "hash": {as_text(k): as_text(v) for k, v in hashed.items()},
        "waiting": waiting,
        "complete": complete,
    }


async def health(deps: Deps, consumer: str | None = None, max_age_s: float = 30.0) -> str | None:
    """None when Redis and PostgreSQL answer (and `consumer`, if given, is alive); else why not."""
    try:
        await deps.redis.ping()
    except (OSError, redis.exceptions.RedisError) as exc:
        return f"redis unreachable: {type(exc).__name__}"
    try:
        await deps.pool.fetchval("SELECT 1")
    except Exception as exc:  # any failure is the answer here, not an error to raise
        return f"postgresql unreachable: {type(exc).__name__}"
    if consumer is None and deps.settings.health_file:
        max_age = 3 * deps.settings.alive_ttl_ms / 1000 + 5
        report, problem = read_report(deps.settings.health_file, max_age)
        if problem is not None or report is None:
            return problem or "no health report"
        consumer = report.consumer
    if consumer is not None:
        beat = await deps.redis.get(deps.keys.alive(consumer))
        if beat is None:
            return f"worker {consumer} has no live heartbeat"
        if time.time() - float(beat) > max_age_s:
            return f"worker {consumer} heartbeat is stale"
    return None

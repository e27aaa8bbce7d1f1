"""Operator queries: per-queue status, one job's whole story, health."""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import redis.exceptions

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.health import read_report
from jobstream.consumers.worker.registry import by_queue
from jobstream.otel.redact import remember_secrets, secrets_of_url
from jobstream.schema.envelope import enqueued_at_ms
from jobstream.schema.payloads import PAYLOADS
from jobstream.schema.text import as_text
from jobstream.schema.times import entry_ms
from jobstream.streams.heartbeat import Heartbeat, read_heartbeat
from jobstream.streams.keys import base_queue, level_of, queue_of_part
from jobstream.streams.levels import level_names
from jobstream.streams.lookup import find_waiting
from jobstream.streams.queue_partitions import parts_of
from jobstream.streams.redis_client import is_cluster

__all__ = [
    "dead_queues",
    "health",
    "job_info",
    "levels_of",
    "live_consumers",
    "queue_status",
    "remember_relays",
    "workers",
]

_ENTRY_ID = re.compile(r"\d{1,15}-\d+")
COUNTS_SQL = "SELECT queue, status, count(*) AS n FROM jobs GROUP BY queue, status"
# By id and creation time: one partition. Without the time (a custom id whose hash has
# expired), every partition's index is probed: an operator's question, never a hot path.
JOB_AT_SQL = "SELECT * FROM jobs WHERE id = $1 AND created_at = to_timestamp($2::float8)"
JOB_SQL = "SELECT * FROM jobs WHERE id = $1 ORDER BY created_at DESC LIMIT 1"
RELAYS_SQL = "SELECT smtp_url FROM mailboxes WHERE smtp_url <> ''"
EXECUTIONS_SQL = (
    "SELECT attempt, outcome, error, duration_ms, worker_id, started_at, finished_at "
    "FROM job_executions WHERE job_id = $1 AND job_created_at = $2 ORDER BY started_at, id"
)


async def remember_relays(deps: Deps) -> None:
    """Remember every mailbox relay's password, so that what is shown is scrubbed of it
    (errors recorded by older versions may carry one)."""
    for row in await deps.pool.fetch(RELAYS_SQL):
        remember_secrets(secrets_of_url(row["smtp_url"]))


async def dead_queues(deps: Deps) -> list[str]:
    """Every queue with a payload or a dead-letter stream, sorted."""
    r, keys = deps.redis, deps.keys
    found = r.scan_iter(match=keys.dead_pattern(), count=1000, _type="stream")
    seen = {queue_of_part(keys.queue_of(k.decode())) async for k in found}
    return sorted(set(PAYLOADS) | seen)


async def live_consumers(deps: Deps) -> dict[str, Heartbeat]:
    """Every consumer whose heartbeat key exists now (its expiry is what proves it alive)."""
    prefix = deps.keys.alive("")
    names = [as_text(k) async for k in deps.redis.scan_iter(match=f"{prefix}*", count=500)]
    beats: dict[str, Heartbeat] = {}
    for i in range(0, len(names), 500):
        chunk = names[i : i + 500]
        r: Any = deps.redis  # on a cluster the keys are in many slots: one MGET per slot
        values = await (r.mget_nonatomic(chunk) if is_cluster(r) else r.mget(chunk))
        for name, raw in zip(chunk, values, strict=True):
            beat = read_heartbeat(raw)
            if beat is not None:
                beats[name[len(prefix) :]] = beat
    return beats


async def _group_consumers(deps: Deps, queue: str) -> list[dict[str, Any]]:
    """XINFO CONSUMERS of the queue's group; empty when the stream or group is missing."""
    try:
        found = await deps.redis.xinfo_consumers(deps.keys.stream(queue), deps.settings.group)
    except redis.exceptions.ResponseError:  # no such stream or group yet
        return []
    return [{k: as_text(v) for k, v in c.items()} for c in found]


async def workers(deps: Deps) -> list[dict[str, Any]]:
    """One row per consumer known to a queue's group or by its heartbeat: whether it is live,
    its heartbeat age, the jobs it runs now and the entries it holds pending."""
    now = time.time()
    beats = await live_consumers(deps)
    rows: dict[str, dict[str, Any]] = {}
    for queue in _queues():
        for c in await _group_consumers(deps, queue):
            row = rows.setdefault(c["name"], {"consumer": c["name"], "pending": 0, "queues": []})
            row["pending"] += int(c["pending"])
            row["queues"].append(queue)
            idle = int(c["idle"]) / 1000
            row["idle_s"] = round(min(idle, row.get("idle_s", idle)), 1)
    for name in beats:
        rows.setdefault(name, {"consumer": name, "pending": 0, "queues": [], "idle_s": None})
    out = []
    for name, row in sorted(rows.items()):
        beat = beats.get(name)
        row["live"] = beat is not None
        row["heartbeat_age_s"] = round(max(0.0, now - beat.at), 1) if beat else None
        row["in_flight"] = beat.in_flight if beat else 0
        row["pid"] = beat.pid if beat and beat.pid else None
        row["host"] = beat.host if beat and beat.host else None
        row["queues"] = sorted(set(row["queues"]) | set(beat.queues if beat else []))
        out.append(row)
    return out


def _queues() -> list[str]:
    return sorted(set(PAYLOADS) | set(by_queue()))


async def _stream_info(deps: Deps, queue: str, live: set[str]) -> dict[str, Any]:
    """A queue's figures, summed over its partitions (the oldest pending of them all)."""
    parts = await parts_of(deps.redis, deps.keys, queue)
    infos = [await _part_info(deps, part, live) for part in parts]
    info = infos[0]
    for other in infos[1:]:
        for field in ("length", "pending", "lag", "delayed", "dead"):
            info[field] += other[field]
        for field in ("consumers", "stale_consumers"):
            info[field] = max(info[field], other[field])
        ages = [a for a in (info["oldest_pending_age_s"], other["oldest_pending_age_s"]) if a]
        info["oldest_pending_age_s"] = max(ages) if ages else None
    info["partitions"] = len(parts)
    return info


async def _part_info(deps: Deps, queue: str, live: set[str]) -> dict[str, Any]:
    """One partition's figures (`queue` names the partition: `q` or `q#n`)."""
    r, keys, group = deps.redis, deps.keys, deps.settings.group
    stream = keys.stream(queue)
    info: dict[str, Any] = {
        "queue": queue_of_part(queue),
        "handled": queue_of_part(queue) in by_queue(),
        "length": int(await r.xlen(stream)),
        "pending": 0,
        "lag": 0,
        "consumers": 0,
        "stale_consumers": 0,
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
        info.update(pending=int(g["pending"]), lag=int(g.get("lag") or 0))
        if int(g["consumers"]):  # a consumer is live while its heartbeat key exists
            names = {c["name"] for c in await _group_consumers(deps, queue)}
            info.update(consumers=len(names & live), stale_consumers=len(names - live))
        if info["pending"]:
            oldest = await r.xpending_range(stream, group, min="-", max="+", count=1)
            if oldest:
                ms = entry_ms(as_text(oldest[0]["message_id"]))
                info["oldest_pending_age_s"] = round(time.time() - ms / 1000, 1)
    return info


def levels_of(queue: str) -> list[str]:
    """The engine's names of a queue's priority levels (the queue alone without levels)."""
    spec = by_queue().get(queue)
    return level_names(queue, spec.policy) if spec is not None else [queue]


async def _levels_info(deps: Deps, queue: str, live: set[str]) -> dict[str, Any]:
    """A queue's stream figures, summed over its priority levels (each also under
    `levels`, by name, when it has levels)."""
    names = levels_of(queue)
    parts = [await _stream_info(deps, name, live) for name in names]
    if len(parts) == 1:
        return parts[0]
    info = {**parts[0], "queue": queue, "handled": queue in by_queue()}
    for key in ("length", "pending", "lag", "delayed"):
        info[key] = sum(p[key] for p in parts)
    for key in ("consumers", "stale_consumers"):
        info[key] = max(p[key] for p in parts)
    ages = [p["oldest_pending_age_s"] for p in parts if p["oldest_pending_age_s"] is not None]
    info["oldest_pending_age_s"] = max(ages) if ages else None
    policy = by_queue()[queue].policy
    info["levels"] = {
        level: {k: p[k] for k in ("length", "pending", "lag", "delayed")}
        for level, p in zip(policy.priorities, parts, strict=True)
    }
    return info


async def queue_status(deps: Deps) -> list[dict[str, Any]]:
    """Per queue: stream length, pending, lag, live and stale consumers, oldest pending age,
    counts by status (all priority levels together, and each under `levels`)."""
    counts: dict[str, dict[str, int]] = {}
    for row in await deps.pool.fetch(COUNTS_SQL):
        counts.setdefault(row["queue"], {})[row["status"]] = row["n"]
    live = set(await live_consumers(deps))
    out = []
    for queue in sorted(set(_queues()) | set(counts)):
        info = await _levels_info(deps, queue, live)
        info["jobs"] = counts.get(queue, {})
        out.append(info)
    return out


async def job_info(deps: Deps, job_id: str, scan_limit: int = 50_000) -> dict[str, Any] | None:
    """The job's row, its executions, its hash, and where it waits when no worker has run it
    yet (a stream or delayed set of a known queue); None when nothing knows it.

    `complete` is false when a stream or delayed set longer than `scan_limit` was read only
    in part (then the answer may be empty rather than None).
    """
    hashed = await deps.redis.hgetall(deps.keys.job(job_id))
    row = await _job_row(deps, job_id, hashed)
    execs = [] if row is None else await deps.pool.fetch(EXECUTIONS_SQL, job_id, row["created_at"])
    waiting, complete = [], True
    if row is None:  # published by any producer, not yet recorded by a worker
        queues = [n for q in _queues() for n in levels_of(q)]
        parts = [p for q in queues for p in await parts_of(deps.redis, deps.keys, q)]
        found, complete = await find_waiting(deps.redis, deps.keys, parts, job_id, scan_limit)
        waiting = [msgspec.to_builtins(w) for w in found]
        for w in waiting:  # a priority level shows as the queue and its level
            level = level_of(w["queue"])
            w["queue"] = base_queue(w["queue"]) + (f" ({level})" if level else "")
    if row is None and not hashed and not waiting and complete:
        return None
    return {
        "job": dict(row) if row is not None else None,
        "executions": [dict(e) for e in execs],
        "hash": {as_text(k): as_text(v) for k, v in hashed.items()},
        "waiting": waiting,
        "complete": complete,
    }


async def _job_row(deps: Deps, job_id: str, hashed: dict[Any, Any]) -> Any:
    """The job's row, looked up in the partition of its creation time when the hash or the
    id (an entry ID, the default) tells it, else in every partition."""
    times = []
    raw = as_text(hashed.get(b"created_ms", b""))
    if raw.isascii() and raw.isdigit():
        times.append(int(raw) / 1000.0)
    if _ENTRY_ID.fullmatch(job_id):
        times.append(enqueued_at_ms(job_id) / 1000.0)
    for at in times:
        row = await deps.pool.fetchrow(JOB_AT_SQL, job_id, at)
        if row is not None:
            return row
    return await deps.pool.fetchrow(JOB_SQL, job_id)


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
        beat = read_heartbeat(await deps.redis.get(deps.keys.alive(consumer)))
        if beat is None:
            return f"worker {consumer} has no live heartbeat"
        if time.time() - beat.at > max_age_s:
            return f"worker {consumer} heartbeat is stale"
    return None

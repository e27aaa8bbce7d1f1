"""Cancelling jobs: the operator's request, and each worker's view of the requests.

A request appends the job id to the queue's stream of cancellations, then one script per
slot (the queue's, or each partition's) removes the job from the delayed sets and deletes
its stream entries that no consumer was given yet (those are recorded `cancelled` and never
run). An entry already
delivered is left to its worker, which reads the cancellations four times a second: it does
not start the job, or cancels its running handler (recorded `cancelled`, acked, no retry).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import msgspec

from jobstream.schema.envelope import created_ms
from jobstream.schema.text import as_text
from jobstream.schema.times import utc_iso
from jobstream.streams.keys import Keys
from jobstream.streams.queue_partitions import parts_of
from jobstream.streams.redis_client import AnyRedis
from jobstream.streams.status import TERMINAL, Status

__all__ = ["CancelAnswer", "CancelWatch", "Cancelled", "cancel_job"]

_CANCEL_LUA = (
    resources.files("jobstream.streams.lua").joinpath("cancel.lua").read_text(encoding="utf-8")
)
_SETHASH_LUA = (
    resources.files("jobstream.streams.lua").joinpath("sethash.lua").read_text(encoding="utf-8")
)
CANCELS_KEPT = 10_000
"""Cancellation requests a queue's stream keeps (about): far more than are ever pending."""
_LAST_FENCE = "9" * 50  # after any delivery's fence: the request is the job's last word
_SCAN = 50_000  # entries of each stream and delayed set searched for the job

# The job's newest row (every partition's index probed: an operator's request).
JOB_SQL = (
    "SELECT queue, status, extract(epoch FROM created_at)::float8 AS created "
    "FROM jobs WHERE id = $1 ORDER BY created_at DESC LIMIT 1"
)
# Only a job no worker is running: a running one is recorded by its worker.
CANCEL_SQL = """
INSERT INTO jobs AS j (id, queue, status, error, created_at, completed_at, updated_at)
VALUES ($1, $2, 'cancelled', 'cancelled by request before it ran', to_timestamp($3::float8),
        now(), now())
ON CONFLICT (id, created_at) DO UPDATE SET status = 'cancelled', error = EXCLUDED.error,
    completed_at = now(), updated_at = now(), next_attempt_at = NULL
WHERE j.status IN ('queued', 'retrying')
RETURNING status
"""


class Cancelled(enum.StrEnum):
    """What a cancellation request found."""

    CANCELLED = "cancelled"  # it was waiting: it never runs
    REQUESTED = "requested"  # it is running: its worker cancels the handler
    TERMINAL = "terminal"  # it was already over
    UNKNOWN = "unknown"  # no store knows the job


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    outcome: Cancelled
    queue: str | None = None
    status: str | None = None  # TERMINAL: the status it ended with
    consumer: str | None = None  # REQUESTED: who holds its entry, when known


async def _queue_of(
    r: AnyRedis, keys: Keys, job_id: str, row: asyncpg.Record | None
) -> tuple[str | None, str | None]:
    """The job's queue and status from PostgreSQL, else from its hash."""
    if row is not None:
        return row["queue"], row["status"]
    raw: Any = await r.hmget(keys.job(job_id), "queue", "status")
    queue, status = (as_text(v) if v else None for v in raw)
    return queue, status


async def _entries(r: AnyRedis, stream: str, job_id: str) -> list[tuple[str, int]]:
    """The entry IDs of the job among the newest entries of a stream, each with the job's
    creation time (ms) it carries."""
    found: list[tuple[str, int]] = []
    end, seen = "+", 0
    while seen < _SCAN:
        page: Any = await r.xrevrange(stream, end, "-", count=500)
        if not page:
            break
        for entry_id, fields in page:
            if as_text(fields.get(b"id", b"")) == job_id:
                found.append((entry_id.decode(), created_ms(entry_id.decode(), fields)))
        seen += len(page)
        end = "(" + page[-1][0].decode()
    return found


async def _members(r: AnyRedis, key: str, job_id: str) -> list[bytes]:
    """The job's members of a delayed set (each a JSON object of an entry's fields)."""
    decoder = msgspec.json.Decoder(dict[str, Any])
    found: list[bytes] = []
    cursor, seen = 0, 0
    while True:
        reply: Any = await r.zscan(key, cursor, count=500)
        cursor, page = reply
        for member, _ in page:
            try:
                fields = decoder.decode(member)
            except msgspec.DecodeError:
                continue
            if str(fields.get("id")) == job_id:
                found.append(member)
        seen += len(page)
        if cursor == 0 or seen >= _SCAN:
            return found


async def _take_out(
    r: AnyRedis,
    keys: Keys,
    group: str,
    job_id: str,
    slots: dict[str, list[str]],
    created: list[float],
) -> tuple[int, bytes | None]:
    """Remove the job's waiting entries and delayed members, one script per slot; return
    how many were removed and a consumer holding an entry (None when none does). The
    creation times the entries carry are added to `created`."""
    removed, holder = 0, None
    for names in slots.values():
        one_slot: list[str] = []
        members: list[Any] = []
        entries: list[Any] = []
        for i, name in enumerate(names, 1):
            one_slot += (keys.delayed(name), keys.stream(name))
            for member in await _members(r, keys.delayed(name), job_id):
                members += (i, member)
            for entry_id, ms in await _entries(r, keys.stream(name), job_id):
                entries += (i, entry_id)
                created.append(ms / 1000)
        reply: Any = await r.eval(
            _CANCEL_LUA, len(one_slot), *one_slot, group, job_id, len(members) // 2,
            *members, *entries,
        )  # fmt: skip
        removed += int(reply[0])
        holder = holder or reply[1] or None
    return removed, holder


async def cancel_job(
    r: AnyRedis,
    pool: asyncpg.Pool,
    keys: Keys,
    job_id: str,
    *,
    group: str = "workers",
    levels: Callable[[str], Sequence[str]] | None = None,
    hash_ttl_s: int,
) -> CancelAnswer:
    """Cancel a job wherever it is (see the module's docstring).

    `levels(queue)` names the queue's priority levels as the engine does (default: the
    queue alone). Idempotent: asked again, a cancelled job answers TERMINAL.
    """
    row = await pool.fetchrow(JOB_SQL, job_id)
    queue, status = await _queue_of(r, keys, job_id, row)
    if status in TERMINAL:
        return CancelAnswer(Cancelled.TERMINAL, queue, status)
    if queue is None:
        return CancelAnswer(Cancelled.UNKNOWN)
    # Each priority level's and each partition's stream and delayed set, grouped by slot:
    # levels share the queue's slot, each partition has its own.
    slots: dict[str, list[str]] = {}
    for level in levels(queue) if levels else [queue]:
        for name in await parts_of(r, keys, level):
            slots.setdefault(keys.queue_of(keys.stream(name)), []).append(name)
    # The request first (one command in the queue's slot), read by the workers of every
    # level and partition: an entry delivered meanwhile is not started.
    await r.xadd(
        keys.cancels(queue),
        {"id": job_id, "at": int(time.time() * 1000)},
        maxlen=CANCELS_KEPT,
        approximate=True,
    )
    created = [row["created"]] if row is not None else []
    removed, holder = await _take_out(r, keys, group, job_id, slots, created)
    consumer = as_text(holder) if holder else None
    if consumer is not None or (status == Status.RUNNING and not removed):
        return CancelAnswer(Cancelled.REQUESTED, queue, status, consumer)
    # The row the job's entry would have had: its creation time names the partition.
    at = created[0] if created else await _hash_created(r, keys, job_id)
    recorded = await pool.fetchval(CANCEL_SQL, job_id, queue, at)
    if recorded is None:  # a worker recorded it meanwhile: running (it cancels) or over
        row = await pool.fetchrow(JOB_SQL, job_id)
        if row is not None and row["status"] in TERMINAL:
            return CancelAnswer(Cancelled.TERMINAL, queue, row["status"])
        return CancelAnswer(Cancelled.REQUESTED, queue, row["status"] if row else None)
    await _hash_cancelled(r, keys, job_id, queue, hash_ttl_s)
    return CancelAnswer(Cancelled.CANCELLED, queue, Status.CANCELLED)


async def _hash_created(r: AnyRedis, keys: Keys, job_id: str) -> float:
    """The job's creation time (epoch seconds) from its hash, else now."""
    raw: Any = await r.hget(keys.job(job_id), "created_ms")
    text = as_text(raw or "")
    return int(text) / 1000 if text.isdigit() else time.time()


async def _hash_cancelled(r: AnyRedis, keys: Keys, job_id: str, queue: str, ttl_s: int) -> None:
    now = utc_iso(time.time())
    fields = ["status", "cancelled", "queue", queue, "updated_at", now, "completed_at", now,
              "error", "cancelled by request before it ran"]  # fmt: skip
    await r.eval(_SETHASH_LUA, 1, keys.job(job_id), _LAST_FENCE, 3, ttl_s, len(fields), *fields)


class CancelWatch:
    """The cancellation requests this worker has seen, per queue, newest kept.

    `poll(queue)` reads the queue's requests written since the last poll (all of the
    kept ones on the first) in one command and returns the new job ids.
    """

    def __init__(self, redis: AnyRedis, keys: Keys, keep: int = 100_000) -> None:
        self._redis = redis
        self._keys = keys
        self._keep = keep
        self._last: dict[str, str] = {}
        self.requested: OrderedDict[str, float] = OrderedDict()  # job id -> when seen

    async def poll(self, queue: str) -> list[str]:
        key, fresh = self._keys.cancels(queue), list[str]()
        while True:
            reply: Any = await self._redis.xread({key: self._last.get(key, "0-0")}, count=1000)
            entries = reply[0][1] if reply else []
            if not entries:
                return fresh
            self._last[key] = entries[-1][0].decode()  # by key: a queue's levels share it
            now = time.time()
            for _, fields in entries:
                job_id = as_text(fields.get(b"id", b""))
                if job_id and job_id not in self.requested:
                    fresh.append(job_id)
                self.requested[job_id] = now
                self.requested.move_to_end(job_id)
            while len(self.requested) > self._keep:
                self.requested.popitem(last=False)
            if len(entries) < 1000:
                return fresh

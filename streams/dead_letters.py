"""Dead letters: what a dead entry carries, and reading, replaying and purging them.

A dead letter is the original entry's fields plus `reason`, `error`, `attempts`,
`failed_at`, `queue`, `job_id` and `entry_id`, in the queue's `jobs:{<queue>}:dead` stream.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from streams.keys import Keys

__all__ = [
    "DeadLetter",
    "count_dead",
    "dead_fields",
    "list_dead",
    "purge_dead",
    "read_dead",
    "replay_all",
    "replay_dead",
]

_ADDED = ("reason", "error", "attempts", "failed_at", "queue", "job_id", "entry_id")


def dead_fields(
    fields: dict[bytes, bytes],
    *,
    queue: str,
    job_id: str,
    entry_id: str,
    reason: str,
    error: str,
    attempts: int,
    failed_at: float,
) -> dict[Any, Any]:
    """The dead letter of an entry: its original fields plus why and when it failed."""
    out: dict[Any, Any] = dict(fields)
    stamp = dt.datetime.fromtimestamp(failed_at, dt.UTC).isoformat(timespec="milliseconds")
    out.update(
        {
            "reason": reason,
            "error": error[:4000],
            "attempts": str(attempts),
            "failed_at": stamp.replace("+00:00", "Z"),
            "queue": queue,
            "job_id": job_id,
            "entry_id": entry_id,
        }
    )
    return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as read back: its id in the dead stream and all its fields."""

    dead_id: str
    queue: str
    fields: dict[str, str]

    @property
    def original(self) -> dict[str, str]:
        """The fields the entry had before it was dead-lettered."""
        return {k: v for k, v in self.fields.items() if k not in _ADDED}


def _decode(queue: str, entry: Any) -> DeadLetter:
    dead_id, fields = entry
    return DeadLetter(
        dead_id.decode(),
        queue,
        {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()},
    )


async def list_dead(
    r: aioredis.Redis, keys: Keys, queue: str, count: int = 100
) -> list[DeadLetter]:
    """The newest `count` dead letters of a queue, newest first."""
    entries: Any = await r.xrevrange(keys.dead(queue), count=count)
    return [_decode(queue, e) for e in entries]


async def read_dead(r: aioredis.Redis, keys: Keys, queue: str, dead_id: str) -> DeadLetter | None:
    """One dead letter by its id in the dead stream, or None."""
    entries: Any = await r.xrange(keys.dead(queue), min=dead_id, max=dead_id, count=1)
    return _decode(queue, entries[0]) if entries else None


async def count_dead(
    r: aioredis.Redis, keys: Keys, queue: str, older_than_ms: int | None = None
) -> int:
    """How many dead letters `purge_dead` with the same arguments would delete now."""
    key = keys.dead(queue)
    if older_than_ms is None:
        return int(await r.xlen(key))
    cutoff = f"({int(time.time() * 1000) - older_than_ms}-0"  # ids below it, as XTRIM MINID
    n, start = 0, "-"
    while entries := await r.xrange(key, min=start, max=cutoff, count=1000):
        n += len(entries)
        start = "(" + _id(entries[-1][0])
    return n


async def purge_dead(
    r: aioredis.Redis, keys: Keys, queue: str, older_than_ms: int | None = None
) -> int:
    """Delete a queue's dead letters (all, or those older than `older_than_ms`); return how many."""
    key = keys.dead(queue)
    if older_than_ms is None:
        n = int(await r.xlen(key))
        await r.delete(key)
        return n
    cutoff = int(time.time() * 1000) - older_than_ms
    before = int(await r.xlen(key))
    await r.xtrim(key, minid=str(cutoff), approximate=False)
    return before - int(await r.xlen(key))


REPLAY_SQL = """
UPDATE jobs SET status = 'queued', error = NULL, next_attempt_at = NULL, updated_at = now(),
                stream_entry_id = $2
WHERE id = $1 AND stream_entry_id IS DISTINCT FROM $2
"""
_REPLAY_LUA = resources.files("streams.lua").joinpath("replay.lua").read_text(encoding="utf-8")
# The hash says `queued` unless a worker already recorded the replayed attempt.
_QUEUED_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'failed' then
    redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', '1', 'error', '')
end
"""


def _id(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def replay_dead(
    r: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, letter: DeadLetter
) -> str | None:
    """Publish a dead letter again with attempt 1, record it `queued`, and drop the letter.

    Returns the new entry ID, or None when the letter was already gone (replayed or purged
    by someone else): publishing and deleting are one script, so a letter is never
    replayed twice and never left beside its replay. The job keeps its id, so its history
    stays in one row.
    """
    fields = letter.original
    fields["attempt"] = "1"
    job_id = letter.fields.get("job_id") or fields.get("id") or letter.dead_id
    fields["id"] = job_id
    move = r.register_script(_REPLAY_LUA)
    entry_id = await move(
        keys=[keys.dead(letter.queue), keys.stream(letter.queue)],
        args=[letter.dead_id, *(x for pair in fields.items() for x in pair)],
    )
    if entry_id is None:
        return None
    entry = _id(entry_id)
    # A worker may already have picked the new entry up: its own record then wins.
    await pool.execute(REPLAY_SQL, job_id, entry)
    await r.register_script(_QUEUED_LUA)(keys=[keys.job(job_id)])
    return entry


async def replay_all(r: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, queue: str) -> int:
    """Replay every dead letter the queue has when called, oldest first, each once.

    Letters written while it runs (a running worker failing the replayed jobs again) have
    later ids than the snapshot and are left for the next replay. Returns how many it
    replayed.
    """
    key = keys.dead(queue)
    newest: Any = await r.xrevrange(key, count=1)
    if not newest:
        return 0
    last, start, n = _id(newest[0][0]), "-", 0
    while entries := await r.xrange(key, min=start, max=last, count=500):
        for entry in entries:
            if await replay_dead(r, pool, keys, _decode(queue, entry)) is not None:
                n += 1
        start = "(" + _id(entries[-1][0])
    return n

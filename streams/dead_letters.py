"""Dead letters: what a dead entry carries, and reading, replaying and purging them.

A dead letter is the original entry's fields plus `reason`, `error`, `attempts`,
`failed_at`, `queue`, `job_id` and `entry_id`, in the queue's `jobs:{<queue>}:dead` stream.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from streams.keys import Keys

__all__ = ["DeadLetter", "dead_fields", "list_dead", "purge_dead", "read_dead", "replay_dead"]

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
WHERE id = $1
"""


async def replay_dead(r: aioredis.Redis, pool: asyncpg.Pool, keys: Keys, letter: DeadLetter) -> str:
    """Publish a dead letter again with attempt 1, record it `queued`, and drop the letter.

    Returns the new entry ID. The job keeps its id, so its history stays in one row.
    """
    fields = letter.original
    fields["attempt"] = "1"
    job_id = letter.fields.get("job_id") or fields.get("id") or letter.dead_id
    fields["id"] = job_id
    entry_id = await r.xadd(keys.stream(letter.queue), fields)  # type: ignore[arg-type]
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    await pool.execute(REPLAY_SQL, job_id, entry)
    await r.hset(keys.job(job_id), mapping={"status": "queued", "attempt": 1, "error": ""})
    await r.xdel(keys.dead(letter.queue), letter.dead_id)
    return entry

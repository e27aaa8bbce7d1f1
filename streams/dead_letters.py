"""Dead letters: what a dead entry carries, and reading, replaying and purging them.

A dead letter is the original entry's fields plus `reason`, `error`, `attempts`,
`failed_at`, `queue`, `job_id` and `entry_id`, in the queue's `jobs:{<queue>}:dead` stream.
No value is kept beyond `MAX_FIELD_BYTES`: a larger payload keeps its prefix with
`payload_size` and `payload_sha256`, any other cut field is named in `truncated`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from jobstream.schema.envelope import created_ms
from jobstream.schema.text import as_text
from jobstream.schema.times import utc_iso
from jobstream.streams.errors import PublishError
from jobstream.streams.job import fence_of
from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = [
    "MAX_FIELD_BYTES",
    "DeadLetter",
    "count_dead",
    "dead_fields",
    "list_dead",
    "purge_dead",
    "read_dead",
    "replay_all",
    "replay_dead",
]

MAX_FIELD_BYTES = 64 * 1024
_CUT = ("payload_size", "payload_sha256", "truncated")
_ADDED = ("reason", "error", "attempts", "failed_at", "queue", "job_id", "entry_id", *_CUT)


def _bounded(fields: dict[bytes, bytes]) -> dict[Any, Any]:
    """The fields with no value over MAX_FIELD_BYTES, and what says what was cut."""
    out: dict[Any, Any] = dict(fields)
    cut = [k for k, v in fields.items() if len(v) > MAX_FIELD_BYTES]
    for k in cut:
        out[k] = fields[k][:MAX_FIELD_BYTES]
    if b"payload" in cut:
        payload = fields[b"payload"]
        out["payload_size"] = str(len(payload))
        out["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    others = [k.decode(errors="replace")[:100] for k in cut if k != b"payload"]
    if others:
        out["truncated"] = ",".join(others)[:4000]
    return out


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
    """The dead letter of an entry: its original fields (bounded) plus why and when it failed."""
    out = _bounded(fields)
    out.update(
        {
            "reason": reason,
            "error": error[:4000],
            "attempts": str(attempts),
            "failed_at": utc_iso(failed_at),
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

    @property
    def cut(self) -> str | None:
        """Why the letter no longer holds the whole entry (a field was truncated), or None."""
        if "payload_size" in self.fields or "payload_sha256" in self.fields:
            size = self.fields.get("payload_size", "?")
            return f"its payload was {size} bytes, only the first {MAX_FIELD_BYTES} are kept"
        if "truncated" in self.fields:
            return f"its fields {self.fields['truncated']} were truncated"
        return None


def _decode(queue: str, entry: Any) -> DeadLetter:
    dead_id, fields = entry
    return DeadLetter(
        dead_id.decode(),
        queue,
        {as_text(k): as_text(v) for k, v in fields.items()},
    )


async def list_dead(
    r: AnyRedis, keys: Keys, queue: str, count: int = 100, before: str | None = None
) -> list[DeadLetter]:
    """The newest `count` dead letters of a queue (older than the id `before`, if given),
    newest first."""
    if before is not None and not before.strip("0-"):
        return []  # nothing is older than 0-0 (and Redis refuses the range)
    newest = "+" if before is None else f"({before}"
    entries: Any = await r.xrevrange(keys.dead(queue), max=newest, count=count)
    return [_decode(queue, e) for e in entries]


async def read_dead(r: AnyRedis, keys: Keys, queue: str, dead_id: str) -> DeadLetter | None:
    """One dead letter by its id in the dead stream, or None."""
    entries: Any = await r.xrange(keys.dead(queue), min=dead_id, max=dead_id, count=1)
    return _decode(queue, entries[0]) if entries else None


async def count_dead(r: AnyRedis, keys: Keys, queue: str, older_than_ms: int | None = None) -> int:
    """How many dead letters `purge_dead` with the same arguments would delete now."""
    key = keys.dead(queue)
    if older_than_ms is None:
        return int(await r.xlen(key))
    cutoff = f"({int(time.time() * 1000) - older_than_ms}-0"  # ids below it, as XTRIM MINID
    n, start = 0, "-"
    while entries := await r.xrange(key, min=start, max=cutoff, count=1000):
        n += len(entries)
        start = "(" + as_text(entries[-1][0])
    return n


async def purge_dead(r: AnyRedis, keys: Keys, queue: str, older_than_ms: int | None = None) -> int:
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


# Before the entry is published, the row says `queued` under the replay's fence (its time,
# delivery 0), below every delivery of the new entry: so its worker's writes, which may come
# before this function returns, always win. The old values come back for an undo.
REPLAY_SQL = """
WITH old AS (
    SELECT id, created_at, status, error, next_attempt_at, fence FROM jobs
    WHERE id = $1 AND created_at = to_timestamp($3::float8) FOR UPDATE
)
UPDATE jobs AS j
SET status = 'queued', error = NULL, next_attempt_at = NULL, updated_at = now(),
    fence = $2::text::numeric
FROM old
WHERE j.id = old.id AND j.created_at = old.created_at
  AND (old.fence IS NULL OR old.fence < $2::text::numeric)
RETURNING old.status, old.error, old.next_attempt_at, old.fence::text AS fence
"""
# Then the row learns the new entry, unless its worker has written since.
REPLAYED_SQL = """
UPDATE jobs SET stream_entry_id = $3
WHERE id = $1 AND created_at = to_timestamp($4::float8) AND fence = $2::text::numeric
"""
# Or, when the letter was gone after all, the row gets back what it said.
UNDO_SQL = """
UPDATE jobs SET status = $3, error = $4, next_attempt_at = $5, fence = $6::text::numeric,
                updated_at = now()
WHERE id = $1 AND created_at = to_timestamp($7::float8) AND fence = $2::text::numeric
"""
# Whether the job's row is still there (its partition not yet dropped by the retention).
HAS_ROW_SQL = "SELECT 1 FROM jobs WHERE id = $1 AND created_at = to_timestamp($2::float8)"
_REPLAY_LUA = (
    resources.files("jobstream.streams.lua").joinpath("replay.lua").read_text(encoding="utf-8")
)
# The hash says `queued`, fenced like every other hash write (sethash.lua): written before
# the entry is published, with the fence of the replay's time and delivery 0, so every
# write of the worker that runs the new entry is newer and is never undone by this one.
_QUEUED_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'fence', 'rank', 'status', 'attempt', 'error',
                      'updated_at')
if cur[1] and cur[1] >= ARGV[1] then
    return false
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', '1', 'error', '', 'fence', ARGV[1],
           'rank', '0', 'updated_at', ARGV[2])
return cur
"""
# The letter was gone after all (replayed or purged meanwhile): put back what the hash said,
# unless something newer was written since.
_UNDO_LUA = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
    return 0
end
local names = {'fence', 'rank', 'status', 'attempt', 'error', 'updated_at'}
for i = 1, 6 do
    local value = ARGV[i + 1]
    if value == '' then
        redis.call('HDEL', KEYS[1], names[i])
    else
        redis.call('HSET', KEYS[1], names[i], value)
    end
end
return 1
"""


async def replay_dead(
    r: AnyRedis, pool: asyncpg.Pool, keys: Keys, letter: DeadLetter
) -> str | None:
    """Publish a dead letter again with attempt 1, record it `queued`, and drop the letter.

    Returns the new entry ID, or None when the letter was already gone (replayed or purged
    by someone else): publishing and deleting are one script, so a letter is never
    replayed twice and never left beside its replay. The job keeps its id, so its history
    stays in one row. Raises PublishError, writing nothing, when the letter no longer
    holds the whole entry.
    """
    if letter.cut is not None:
        raise PublishError(
            f"dead letter {letter.dead_id} of {letter.queue} cannot be replayed: {letter.cut} "
            "(publish the job again from its source)"
        )
    fields = letter.original
    fields["attempt"] = "1"
    job_id = letter.fields.get("job_id") or fields.get("id") or letter.dead_id
    fields["id"] = job_id
    # The replay names the job's row (and partition) by the job's creation time; a job
    # whose row the retention has dropped starts afresh, created by the replay's entry.
    raw = {k.encode(): v.encode() for k, v in fields.items() if k == "created_ms"}
    created = created_ms(letter.fields.get("entry_id") or letter.dead_id, raw) / 1000.0
    fields.pop("created_ms", None)
    if await pool.fetchval(HAS_ROW_SQL, job_id, created):
        fields["created_ms"] = str(round(created * 1000))
    seconds, micros = await r.time()  # the new entry's ID is at least this (Redis's clock)
    fence = fence_of(f"{seconds * 1000 + micros // 1000}-0", 0)
    hashed = keys.job(job_id)
    row = await pool.fetchrow(REPLAY_SQL, job_id, fence, created)
    before = await r.register_script(_QUEUED_LUA)(
        keys=[hashed], args=[fence, utc_iso(seconds + micros / 1e6)]
    )
    move = r.register_script(_REPLAY_LUA)
    entry_id = await move(
        keys=[keys.dead(letter.queue), keys.stream(letter.queue)],
        args=[letter.dead_id, *(x for pair in fields.items() for x in pair)],
    )
    if entry_id is None:
        if before is not None:
            undo = [as_text(v) if v is not None else "" for v in before]
            await r.register_script(_UNDO_LUA)(keys=[hashed], args=[fence, *undo])
        if row is not None:
            await pool.execute(UNDO_SQL, job_id, fence, *row.values(), created)
        return None
    entry = as_text(entry_id)
    await pool.execute(REPLAYED_SQL, job_id, fence, entry, created)
    return entry


async def replay_all(
    r: AnyRedis,
    pool: asyncpg.Pool,
    keys: Keys,
    queue: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, list[str]]:
    """Replay every dead letter the queue has when called, oldest first, each once.

    Letters written while it runs (a running worker failing the replayed jobs again) have
    later ids than the snapshot and are left for the next replay. Letters that no longer
    hold their whole entry (`DeadLetter.cut`) stay. Returns how many it replayed and the
    ids of those it left; `progress(n)` is called after each batch.
    """
    key = keys.dead(queue)
    newest: Any = await r.xrevrange(key, count=1)
    if not newest:
        return 0, []
    last, start, n, kept = as_text(newest[0][0]), "-", 0, []
    while entries := await r.xrange(key, min=start, max=last, count=500):
        for entry in entries:
            letter = _decode(queue, entry)
            if letter.cut is not None:
                kept.append(letter.dead_id)
            elif await replay_dead(r, pool, keys, letter) is not None:
                n += 1
        start = "(" + as_text(entries[-1][0])
        if progress is not None:
            progress(n)
    return n, kept

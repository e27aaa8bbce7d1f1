"""Find a job that no worker has run yet: its entries in a queue's stream and delayed set.

Read-only and bounded: an operator's question, never on the hot path.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from jobstream.schema.text import as_text
from jobstream.schema.times import utc_iso
from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Waiting", "find_waiting"]

_ENTRY_ID = re.compile(r"\d+-\d+")


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a job not yet recorded by a worker: in the stream or in the delayed set."""

    queue: str
    where: str
    """`stream` (waiting or being delivered) or `delayed` (published with a delay)."""
    entry_id: str | None = None
    """The stream entry ID (`stream` only)."""
    due_at: str | None = None
    """When it moves to the stream, ISO-8601 UTC (`delayed` only)."""
    attempt: str | None = None
    traceparent: str | None = None


def _stream_hit(queue: str, entry_id: Any, raw: dict[Any, Any]) -> tuple[Waiting, dict[str, str]]:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    hit = Waiting(
        queue=queue,
        where="stream",
        entry_id=as_text(entry_id),
        attempt=fields.get("attempt", "1"),
        traceparent=fields.get("traceparent"),
    )
    return hit, fields


async def _in_stream(
    r: AnyRedis, keys: Keys, queue: str, job_id: str, limit: int
) -> tuple[list[Waiting], bool]:
    """The job's entries among the newest `limit` of the stream; and whether all were read."""
    stream, hits, seen = keys.stream(queue), [], 0
    if _ENTRY_ID.fullmatch(job_id):  # a job without an `id` field is known by its entry ID
        direct: Any = await r.xrange(stream, job_id, job_id, count=1)
        for entry_id, raw in direct:
            hit, fields = _stream_hit(queue, entry_id, raw)
            if not fields.get("id"):  # with an `id` field, the scan below finds it
                hits.append(hit)
    end = "+"
    while seen < limit:
        page: Any = await r.xrevrange(stream, end, "-", count=min(500, limit - seen))
        if not page:
            return hits, True
        for entry_id, raw in page:
            hit, fields = _stream_hit(queue, entry_id, raw)
            if fields.get("id") == job_id:
                hits.append(hit)
        seen += len(page)
        end = f"({as_text(page[-1][0])}"  # exclusive: continue below the last one read
    return hits, int(await r.xlen(stream)) <= limit


async def _in_delayed(
    r: AnyRedis, keys: Keys, queue: str, job_id: str, limit: int
) -> tuple[list[Waiting], bool]:
    """The job's members of the delayed set (each a JSON object of the entry's fields)."""
    hits, seen, cursor = [], 0, 0
    decoder = msgspec.json.Decoder(dict[str, Any])
    while True:
        reply: Any = await r.zscan(keys.delayed(queue), cursor, count=500)
        cursor, page = reply
        for member, score in page:
            try:
                fields = decoder.decode(member)
            except msgspec.DecodeError:
                continue  # the promoter dead-letters it; it names no job we can match
            if str(fields.get("id")) == job_id:
                hits.append(
                    Waiting(
                        queue=queue,
                        where="delayed",
                        due_at=utc_iso(int(score) / 1000),
                        attempt=str(fields.get("attempt", "1")),
                        traceparent=fields.get("traceparent"),
                    )
                )
        seen += len(page)
        if cursor == 0:
            return hits, True
        if seen >= limit:
            return hits, False


async def find_waiting(
    r: AnyRedis, keys: Keys, queues: list[str], job_id: str, limit: int = 50_000
) -> tuple[list[Waiting], bool]:
    """Where a job waits in these queues' streams and delayed sets; and whether all was read.

    Reads at most `limit` entries of each stream (newest first) and of each delayed set.
    """
    hits: list[Waiting] = []
    complete = True
    for queue in queues:
        for find in (_in_stream, _in_delayed):
            found, whole = await find(r, keys, queue, job_id, limit)
            hits += found
            complete = complete and whole
    return hits, complete

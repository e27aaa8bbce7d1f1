"""Bounded memory: trim acknowledged entries, never below what a group still needs (inv. 8)."""

from __future__ import annotations

import redis.asyncio as aioredis

from streams.keys import Keys

__all__ = ["safe_min_id", "trim"]


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def safe_min_id(r: aioredis.Redis, stream: str) -> str | None:
    """The lowest ID to keep: each group's oldest pending entry and its last-delivered entry."""
    lowest: str | None = None
    for group in await r.xinfo_groups(stream):
        name = group["name"]
        candidates = []
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        candidates.append(last)  # never below the group's last-delivered entry
        if int(group["pending"]) > 0:
            summary = await r.xpending(stream, name)
            low = summary["min"]  # None: the last pending entry was acked since XINFO
            if low is not None:
                candidates.append(low.decode() if isinstance(low, bytes) else low)
        for c in candidates:
            if lowest is None or _key(c) < _key(lowest):
                lowest = c
    return lowest


async def trim(r: aioredis.Redis, keys: Keys, queue: str) -> int:
    """Drop acknowledged entries older than every group's needs; return how many."""
    stream = keys.stream(queue)
    min_id = await safe_min_id(r, stream)
    if min_id is None:
        return 0
    return int(await r.xtrim(stream, minid=min_id, approximate=False))

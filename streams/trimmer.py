"""Bounded memory: trim acknowledged entries, never below what a group still needs, and cap
dead-letter streams by age, entries and bytes (inv. 8).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jobstream.schema.text import as_text
from jobstream.schema.times import entry_parts
from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["DeadLetterCaps", "DeadLetterTrimmer", "safe_min_id", "trim"]

logger = logging.getLogger(__name__)
_BYTES_LUA = (
    resources.files("jobstream.streams.lua").joinpath("trim_dead_bytes.lua").read_text("utf-8")
)


async def safe_min_id(r: AnyRedis, stream: str) -> str | None:
    """The lowest ID to keep: each group's oldest pending entry and its last-delivered entry."""
    lowest: str | None = None
    for group in await r.xinfo_groups(stream):
        name = group["name"]
        candidates = []
        last = group["last-delivered-id"]
        candidates.append(as_text(last))  # never below the group's last-delivered entry
        if int(group["pending"]) > 0:
            summary = await r.xpending(stream, name)
            low = summary["min"]  # None: the last pending entry was acked since XINFO
            if low is not None:
                candidates.append(as_text(low))
        for c in candidates:
            if lowest is None or entry_parts(c) < entry_parts(lowest):
                lowest = c
    return lowest


async def trim(r: AnyRedis, keys: Keys, queue: str) -> int:
    """Drop acknowledged entries older than every group's needs; return how many."""
    stream = keys.stream(queue)
    min_id = await safe_min_id(r, stream)
    if min_id is None:
        return 0
    return int(await r.xtrim(stream, minid=min_id, approximate=False))


@dataclass(frozen=True, slots=True)
class DeadLetterCaps:
    """How long and how much of a queue's dead letters are kept (0 turns a cap off)."""

    max_age_s: float = 30 * 86400
    max_bytes: int = 256 * 1024 * 1024
    max_len: int = 100_000


class DeadLetterTrimmer:
    """Applies the caps to each queue's dead-letter stream; says what each cap removed.

    A failed job keeps its dead letter until the operator removes it or `max_age_s` passes;
    the entry and byte caps only protect Redis' memory, and what they drop is logged.
    """

    def __init__(self, redis: AnyRedis, keys: Keys, caps: DeadLetterCaps) -> None:
        self._redis = redis
        self._keys = keys
        self.caps = caps
        self._by_bytes = redis.register_script(_BYTES_LUA)

    async def trim(self, queue: str, now_ms: int | None = None) -> dict[str, int]:
        """Drop dead letters past the caps, oldest first; return how many per cap
        (`age`, `entries`, `bytes`), caps that removed nothing left out."""
        key, caps = self._keys.dead(queue), self.caps
        removed: dict[str, int] = {}
        now = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now - int(caps.max_age_s * 1000)
        if caps.max_age_s > 0 and cutoff > 0:
            removed["age"] = int(await self._redis.xtrim(key, minid=cutoff, approximate=False))
        if caps.max_len > 0:
            removed["entries"] = int(
                await self._redis.xtrim(key, maxlen=caps.max_len, approximate=False)
            )
        if caps.max_bytes > 0:
            reply: Any = await self._by_bytes(keys=[key], args=[caps.max_bytes])
            removed["bytes"] = int(reply[0])
            if removed["bytes"]:
                logger.warning("dropped the %d oldest dead letters of %s: the stream used %d "
                               "bytes, over its cap of %d (JOBSTREAM_DEAD_LETTER_MAX_BYTES)",
                               removed["bytes"], queue, int(reply[1]), caps.max_bytes)  # fmt: skip
        if removed.get("age"):
            logger.info("expired %d dead letters of %s older than %gs "
                        "(JOBSTREAM_DEAD_LETTER_MAX_AGE_S)", removed["age"], queue,
                        caps.max_age_s)  # fmt: skip
        if removed.get("entries"):
            logger.warning("dropped the %d oldest dead letters of %s over its cap of %d "
                           "entries (JOBSTREAM_DEAD_MAXLEN)", removed["entries"], queue,
                           caps.max_len)  # fmt: skip
        return {cap: n for cap, n in removed.items() if n}

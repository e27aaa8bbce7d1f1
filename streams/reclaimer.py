"""Taking over what dead replicas left pending, without stealing from live ones (inv. 4).

A replica proves it is alive with a short-TTL key. Entries of consumers without one are
claimed at once; anything idle past the safety ceiling is claimed whoever holds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from streams.job import Delivery
from streams.keys import Keys

__all__ = ["Reclaimer"]

logger = logging.getLogger(__name__)
_DELCONSUMER_LUA = resources.files("streams.lua").joinpath("delconsumer.lua").read_text("utf-8")
_REFRESH_LUA = resources.files("streams.lua").joinpath("refresh.lua").read_text("utf-8")


@dataclass
class Reclaimer:
    redis: aioredis.Redis
    keys: Keys
    group: str
    consumer: str
    ceiling_ms: int = 3_600_000
    claim_min_idle_ms: int = 1_000
    batch: int = 100
    _cursors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._delconsumer = self.redis.register_script(_DELCONSUMER_LUA)
        self._refresh = self.redis.register_script(_REFRESH_LUA)

    async def reclaim(self, queue: str) -> list[Delivery]:
        """Claim entries of dead consumers and of any consumer past the ceiling."""
        stream = self.keys.stream(queue)
        out: list[Delivery] = []
        consumers: Any = await self.redis.xinfo_consumers(stream, self.group)
        for info in consumers:
            name = _text(info["name"])
            if name == self.consumer:
                continue
            if await self.redis.exists(self.keys.alive(name)):
                continue
            if int(info["pending"]) == 0:
                if int(info.get("idle", 0)) > self.claim_min_idle_ms and int(
                    await self._delconsumer(keys=[stream], args=[self.group, name])
                ):
                    logger.info("removed gone consumer %s from %s", name, stream)
                continue
            out += await self._claim_from(queue, stream, name)
        out += await self._claim_ceiling(queue, stream)
        return out

    async def _claim_from(self, queue: str, stream: str, name: str) -> list[Delivery]:
        rows: Any = await self.redis.xpending_range(
            stream, self.group, min="-", max="+", count=self.batch, consumername=name
        )
        counts = {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        if not counts:
            return []
        claimed: Any = await self.redis.xclaim(
            stream,
            self.group,
            self.consumer,
            self.claim_min_idle_ms,
            list(counts),
        )
        got = [
            Delivery(queue, _text(eid), fields, counts.get(_text(eid), 0) + 1)
            for eid, fields in claimed
            if fields
        ]
        if got:
            logger.warning("reclaimed %d entries of dead consumer %s on %s", len(got), name, stream)
        return got

    async def _claim_ceiling(self, queue: str, stream: str) -> list[Delivery]:
        start = self._cursors.get(stream, "0-0")
        reply: Any = await self.redis.xautoclaim(
            stream, self.group, self.consumer, self.ceiling_ms, start, count=self.batch
        )
        self._cursors[stream] = _text(reply[0])  # walk the whole pending list over time
        claimed = reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # Redis 7 drops deleted entries from the pending list and reports them
            logger.warning(
                "%d pending entries of %s were deleted before being processed: %s",
                len(deleted),
                stream,
                ", ".join(_text(d) for d in deleted[:10]),
            )
        if not claimed:
            return []
        ids = [_text(eid) for eid, _ in claimed]
        counts = await self._delivery_counts(stream, ids)
        logger.warning("reclaimed %d entries idle past the ceiling on %s", len(ids), stream)
        return [
            Delivery(queue, _text(eid), fields, counts.get(_text(eid), 2))
            for eid, fields in claimed
            if fields
        ]

    async def own_pending(self, queue: str, after: str = "0-0") -> tuple[list[Delivery], str]:
        """Entries this consumer name already holds after `after`, and the next cursor
        ("" when there are no more). A restarted worker resumes them first.

        Entries deleted from the stream meanwhile have nothing left to run: they are acked.
        """
        stream = self.keys.stream(queue)
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {stream: after}, count=self.batch
        )
        entries = reply[0][1] if reply else []
        if not entries:
            return [], ""
        cursor = _text(entries[-1][0]) if len(entries) >= self.batch else ""
        gone = [eid for eid, fields in entries if not fields]  # an entry has at least one field
        if gone:
            logger.warning("%d entries of %s were deleted before being processed", len(gone),
                           stream)  # fmt: skip
            await self.redis.xack(stream, self.group, *gone)
        entries = [(eid, fields) for eid, fields in entries if fields]
        if not entries:
            return [], cursor
        ids = [_text(eid) for eid, _ in entries]
        counts = await self._delivery_counts(stream, ids)
        found = [
            Delivery(queue, eid, fields, counts.get(eid, 2))
            for eid, (_, fields) in zip(ids, entries, strict=True)
        ]
        return found, cursor

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        """How often Redis has delivered each of our pending entries `ids` (sorted)."""
        rows: Any = await self.redis.xpending_range(
            stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2,
            consumername=self.consumer,
        )  # fmt: skip
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def refresh(self, queue: str, entry_ids: list[Any]) -> None:
        """Reset the idle time of our own long-running entries so the ceiling never takes them.

        Only those still ours: after a pause, what another replica took stays with it.
        """
        if entry_ids:
            await self._refresh(
                keys=[self.keys.stream(queue)], args=[self.group, self.consumer, *entry_ids]
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""Taking over what dead replicas left pending, without stealing from live ones (inv. 4).

A replica proves it is alive with a short-TTL key. Entries of consumers without one are
claimed at once; anything idle past the safety ceiling is claimed whoever holds it. Every
claim names the consumer it takes from and is refused if another took the entry first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from jobstream.schema.text import as_text
from jobstream.streams.job import Delivery
from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Pending", "Reclaimer"]

logger = logging.getLogger(__name__)
_LUA = resources.files("jobstream.streams.lua")
_DELCONSUMER_LUA = _LUA.joinpath("delconsumer.lua").read_text("utf-8")
_CLAIM_LUA = _LUA.joinpath("claim.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Pending:
    """A pending entry as the group's pending list shows it (nothing claimed yet)."""

    entry_id: str
    owner: str
    deliveries: int  # how often Redis has delivered it so far


@dataclass
class Reclaimer:
    redis: AnyRedis
    keys: Keys
    group: str
    consumer: str
    ceiling_ms: int = 3_600_000
    claim_min_idle_ms: int = 1_000
    batch: int = 100
    _cursors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._delconsumer = self.redis.register_script(_DELCONSUMER_LUA)
        self._claim = self.redis.register_script(_CLAIM_LUA)

    async def dead_consumers(self, queue: str) -> list[str]:
        """Consumers of `queue` that hold entries and no longer prove they are alive.

        Gone consumers that hold nothing are removed from the group on the way.
        """
        stream = self.keys.stream(queue)
        dead: list[str] = []
        consumers: Any = await self.redis.xinfo_consumers(stream, self.group)
        for info in consumers:
            try:
                name = as_text(info["name"], errors="strict")
            except UnicodeDecodeError:  # not a worker's name; the ceiling takes its entries
                continue
            if name == self.consumer or await self.redis.exists(self.keys.alive(name)):
                continue
            if int(info["pending"]) == 0:
                if int(info.get("idle", 0)) > self.claim_min_idle_ms and int(
                    await self._delconsumer(keys=[stream], args=[self.group, name])
                ):
                    logger.info("removed gone consumer %s from %s", name, stream)
                continue
            dead.append(name)
        return dead

    async def pending(
        self, queue: str, owner: str, *, after: str = "-", idle_ms: int | None = None
    ) -> list[Pending]:
        """Up to `batch` entries `owner` holds, after entry id `after` (exclusive unless "-"),
        idle at least `idle_ms` if given. Lists only: delivery counts are unchanged."""
        rows: Any = await self.redis.xpending_range(
            self.keys.stream(queue), self.group, min=after if after == "-" else f"({after}",
            max="+", count=self.batch, consumername=owner, idle=idle_ms,
        )  # fmt: skip
        return [Pending(as_text(r["message_id"]), owner, int(r["times_delivered"])) for r in rows]

    async def claim(self, queue: str, owner: str, entries: list[Pending]) -> list[Delivery]:
        """Take `entries` from `owner` (which may be this consumer itself) and return them
        with their new delivery counts. What `owner` no longer holds is not taken; what was
        deleted from the stream meanwhile leaves the pending list."""
        if not entries:
            return []
        stream = self.keys.stream(queue)
        got: Any = await self._claim(
            keys=[stream],
            args=[self.group, owner, self.consumer, "", *(p.entry_id for p in entries)],
        )
        counts = {p.entry_id: p.deliveries + 1 for p in entries}
        out = [
            Delivery(queue, eid, _fields(flat), counts.get(eid, 2))
            for eid, flat in ((as_text(e[0]), e[1]) for e in got)
            if flat
        ]
        if out and owner != self.consumer:
            logger.warning("reclaimed %d entries of dead consumer %s on %s", len(out), owner,
                           stream)  # fmt: skip
        return out

    async def claim_ceiling(self, queue: str) -> list[Delivery]:
        """Claim entries idle past the ceiling, whoever holds them (the safety net)."""
        stream = self.keys.stream(queue)
        start = self._cursors.get(stream, "0-0")
        reply: Any = await self.redis.xautoclaim(
            stream, self.group, self.consumer, self.ceiling_ms, start, count=self.batch
        )
        self._cursors[stream] = as_text(reply[0])  # walk the whole pending list over time
        claimed = reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # Redis 7 drops deleted entries from the pending list and reports them
            logger.warning(
                "%d pending entries of %s were deleted before being processed: %s",
                len(deleted),
                stream,
                ", ".join(as_text(d) for d in deleted[:10]),
            )
        if not claimed:
            return []
        ids = [as_text(eid) for eid, _ in claimed]
        counts = await self._delivery_counts(stream, ids)
        logger.warning("reclaimed %d entries idle past the ceiling on %s", len(ids), stream)
        return [
            Delivery(queue, as_text(eid), fields, counts.get(as_text(eid), 2))
            for eid, fields in claimed
            if fields
        ]

    async def _delivery_counts(self, stream: str, ids: list[str]) -> dict[str, int]:
        """How often Redis has delivered each of our pending entries `ids` (sorted)."""
        rows: Any = await self.redis.xpending_range(
            stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2,
            consumername=self.consumer,
        )  # fmt: skip
        return {as_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def refresh(self, queue: str, entry_ids: list[str]) -> set[str]:
        """Reset the idle time of entries we hold so the ceiling never takes them; return
        those we still hold (one another replica took is left with it)."""
        if not entry_ids:
            return set()
        got: Any = await self._claim(
            keys=[self.keys.stream(queue)],
            args=[self.group, self.consumer, self.consumer, "JUSTID", *entry_ids],
        )
        return {as_text(eid) for eid in got}


def _fields(flat: Any) -> dict[bytes, bytes]:
    """A script's reply of an entry's fields (a flat list) as the mapping redis-py returns."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))

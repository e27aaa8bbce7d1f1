"""Partitioned queues: which partition a job goes to, and which partitions a queue has.

A queue of P partitions is P streams, `jobs:{<queue>}` and `jobs:{<queue>#<n>}` for n of
1 to P-1, each with its own delayed set and dead letters, each in its own cluster slot.
Every partition number ever used is kept in `jobs:{<queue>}:partitions`, so lowering P
strands nothing: workers keep reading every partition that set names.
"""

from __future__ import annotations

import itertools
import zlib

from jobstream.schema.text import as_text
from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Chooser", "parts_of", "register"]


class Chooser:
    """Picks a partition: by a key's stable hash (one key's jobs keep their order), or
    round-robin when the job has no key."""

    def __init__(self) -> None:
        self._turns: dict[str, itertools.count[int]] = {}

    def pick(self, queue: str, count: int, key: str | None) -> int:
        if count <= 1:
            return 0
        if key is not None:  # CRC-32: the same in every process and language
            return zlib.crc32(key.encode()) % count
        turn = self._turns.setdefault(queue, itertools.count())
        return next(turn) % count


async def register(r: AnyRedis, keys: Keys, queue: str, count: int) -> None:
    """Record that the queue's partitions 0 to `count`-1 are in use (none for one)."""
    if count > 1:
        await r.sadd(keys.partitions(queue), *range(count))


async def parts_of(r: AnyRedis, keys: Keys, queue: str, count: int = 1) -> list[str]:
    """The queue's partitions, named as queues (`q`, `q#1`, ...): 0 to `count`-1 and every
    other one ever used."""
    used: set[int] = set(range(count))
    for raw in await r.smembers(keys.partitions(queue)):
        text = as_text(raw)
        if text.isdigit():
            used.add(int(text))
    return [keys.part(queue, n) for n in sorted(used)]

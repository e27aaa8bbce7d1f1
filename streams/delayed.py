"""The delayed set of each queue: retries and delayed jobs, moved to the stream when due."""

from __future__ import annotations

import time
from importlib import resources

from jobstream.streams.keys import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Promoter"]

_PROMOTE_LUA = (
    resources.files("jobstream.streams.lua").joinpath("promote.lua").read_text(encoding="utf-8")
)


class Promoter:
    """Atomically moves due members of `jobs:{q}:delayed` into `jobs:{q}` (one queue per call)."""

    def __init__(
        self, redis: AnyRedis, keys: Keys, batch: int = 500, max_fields: int = 1000
    ) -> None:
        self._script = redis.register_script(_PROMOTE_LUA)
        self._keys = keys
        self._batch = batch
        self._max_fields = max_fields  # a member with more keeps the contract's fields only

    async def promote(self, queue: str, now_ms: int | None = None) -> int:
        """Move what is due now; return how many entries were published."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        moved = 0
        while True:
            n = int(
                await self._script(
                    keys=[self._keys.delayed(queue), self._keys.stream(queue)],
                    args=[now, self._batch, self._max_fields],
                )
            )
            moved += n
            if n < self._batch:
                return moved

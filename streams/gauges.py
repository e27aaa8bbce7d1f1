"""A queue's gauges (pending, lag, dead letters), reported by one replica at a time.

They describe the queue, not the replica: if every replica exported them, a sum across
replicas would count them once per replica. A short lease in Redis names the replica that
reports a queue; the others withdraw their series, so `sum` and `max` agree.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from jobstream.streams.keys import Keys, level_of, level_queue
from jobstream.streams.observe import Observer
from jobstream.streams.redis_client import AnyRedis

__all__ = ["QueueGauges"]

_LEASE_LUA = (
    resources.files("jobstream.streams.lua").joinpath("gauge_lease.lua").read_text(encoding="utf-8")
)


class QueueGauges:
    """Reads and reports the gauges of the queues whose lease this replica holds.

    The lease lasts `ttl_ms` and is renewed at each report: when its holder stops, another
    replica takes it over within `ttl_ms` plus one report interval.
    """

    def __init__(self, redis: AnyRedis, keys: Keys, group: str, holder: str, ttl_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group.encode()  # compared as bytes: a group name need not be UTF-8
        self._holder = holder
        self._ttl_ms = max(1, ttl_ms)
        self._script = redis.register_script(_LEASE_LUA)
        self.held: set[str] = set()

    async def report(self, queue: str, observer: Observer) -> None:
        """Report `queue`'s gauges if this replica holds (or can take) its lease."""
        lease = self._keys.gauge_lease(queue)
        if not int(await self._script(keys=[lease], args=[self._holder, self._ttl_ms])):
            self.held.discard(queue)
            observer.queue_stats_withdrawn(_label(queue))
            return
        self.held.add(queue)
        groups: Any = await self._redis.xinfo_groups(self._keys.stream(queue))
        for g in groups:
            if g["name"] == self._group:
                dead = int(await self._redis.xlen(self._keys.dead(queue)))
                pending, lag = int(g["pending"]), int(g.get("lag") or 0)
                observer.queue_stats(_label(queue), pending, lag, dead)

    async def release(self) -> None:
        """Give up every lease held, so another replica reports at its next interval."""
        for queue in sorted(self.held):
            await self._script(keys=[self._keys.gauge_lease(queue)], args=[self._holder, 0])
        self.held.clear()


def _label(name: str) -> str:
    """A lane's name as a metric label: a priority level shows as `<queue>:<level>` (as its
    stream key), a partition as `<queue>#<n>`."""
    level = level_of(name)
    return name if level is None else f"{name.removesuffix(level_queue('', level))}:{level}"

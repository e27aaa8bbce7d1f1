"""This replica's lease on its pending entries, as the other replicas see it (inv. 4, 9).

Other replicas take over a consumer's entries only once its liveness key has expired. So
while every heartbeat has landed within the key's TTL, nothing this replica holds can have
been taken; after a gap (a pause: SIGSTOP, GC, a frozen VM), anything it read before the
gap may now belong to another replica and must be checked before its outcome is written.
"""

from __future__ import annotations

import math
import time

__all__ = ["Lease", "clock"]


def clock() -> float:
    """Seconds on a clock that keeps counting while the machine or process is suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Lease:
    """Tracks since when this replica's liveness key has been continuously held."""

    def __init__(self, ttl_s: float, margin: float = 0.8) -> None:
        self._ttl = ttl_s * margin  # a heartbeat older than this may already have expired
        self._last_ok = -math.inf
        self._since = math.inf

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` (before it reached Redis) was confirmed."""
        if sent_at - self._last_ok > self._ttl:
            self._since = sent_at  # the key may have lapsed before this one: a new lease
        self._last_ok = max(self._last_ok, sent_at)

    def held_since(self) -> float:
        """Start of the unbroken lease held now; +inf when it may have lapsed already."""
        return self._since if clock() - self._last_ok < self._ttl else math.inf

    def covers(self, read_at: float) -> bool:
        """True when an entry read at `read_at` cannot have been taken over since."""
        return read_at >= self.held_since()

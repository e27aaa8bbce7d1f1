"""Priority levels of a queue: the slots its levels share and the weighted order in which
free slots go to them (smooth weighted round robin, as nginx balances upstreams).

While every level has work, level i gets weight_i / sum(weights) of the starts, spread
evenly (4, 2, 1: high, normal, high, low, high, normal, high); the share of a level with
nothing waiting goes to the highest levels that have work, so no slot idles and no level
with work starves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from jobstream.streams.keys import level_queue
from jobstream.streams.policy import Policy

__all__ = ["Slots", "WeightedOrder", "level_names"]


class Slots:
    """A queue's concurrency, shared by the lanes of its levels."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.used = 0
        self.free = asyncio.Event()
        self.free.set()

    @property
    def room(self) -> int:
        return self.concurrency - self.used

    def take(self) -> None:
        self.used += 1
        if self.used >= self.concurrency:
            self.free.clear()

    def give(self) -> None:
        self.used -= 1
        self.free.set()


class WeightedOrder:
    """Which level each of the next free slots goes to; its state carries over calls, so
    one slot at a time follows the same order as many at once."""

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = list(weights)
        self._total = sum(self._weights)
        self._current = [0] * len(self._weights)

    def take(self, slots: int) -> list[int]:
        """How many of `slots` go to each level."""
        counts = [0] * len(self._weights)
        current, weights = self._current, self._weights
        for _ in range(slots):
            for i, w in enumerate(weights):
                current[i] += w
            best = max(range(len(current)), key=current.__getitem__)
            current[best] -= self._total
            counts[best] += 1
        return counts


def level_names(queue: str, policy: Policy) -> list[str]:
    """The engine's names of a queue's levels, highest first (the queue alone without)."""
    return [level_queue(queue, level) for level, _ in policy.levels()]

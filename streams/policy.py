"""Per-queue execution policy: attempts, backoff, timeout, concurrency, priority levels."""

from __future__ import annotations

import random
import re

import msgspec

from jobstream.streams.errors import ConfigError

__all__ = ["RESERVED_LEVELS", "Policy", "backoff_s"]

RESERVED_LEVELS = frozenset({"delayed", "dead", "cancels", "unique", "schedule"})
"""Names a priority level cannot take: the queue's other keys end with them."""
_LEVEL = re.compile(r"[a-z0-9_-]{1,32}")


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """How a queue's jobs run and retry."""

    max_attempts: int = 5
    """Attempts in all, the first included; then the job fails and is dead-lettered."""
    backoff_base_s: float = 1.0
    """Exponential backoff base: attempt n waits up to base * 2**(n-1) seconds."""
    backoff_cap_s: float = 300.0
    """Upper bound of any one backoff."""
    timeout_s: float = 60.0
    """A handler running longer is cancelled and the attempt counts as a timeout (within a
    tenth of the shortest timeout the worker serves, at most 1 s late)."""
    concurrency: int = 32
    """Jobs of this queue in flight at once in one worker (all its priority levels; a batch
    counts all its jobs)."""
    priorities: tuple[str, ...] = ()
    """Priority levels, highest first, each its own stream in the queue's slot
    (`jobs:{q}:<level>`); empty: one level, `jobs:{q}`."""
    priority_weights: tuple[int, ...] = ()
    """How many of each level's jobs start for one of the lowest's while all have work
    (default: 2**(n-1-i), e.g. 4, 2, 1)."""
    default_priority: str = ""
    """The level whose stream keeps the queue's own key `jobs:{q}` (so producers that know
    no levels publish to it); default: `normal` if declared, else the lowest level."""
    partitions: int = 1
    """Streams the queue is split into (`jobs:{<queue>}`, then `jobs:{<queue>#<n>}`); a
    queue with priority levels has one."""
    batch_size: int = 100
    """A batch handler gets at most this many jobs at once (capped by `concurrency`)."""
    batch_wait_s: float = 0.01
    """A batch handler's first job waits at most this long for more to join its batch."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        if not 1 <= self.partitions <= 1024:
            raise ConfigError(f"partitions must be 1 to 1024, got {self.partitions}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.batch_wait_s <= 60:
            raise ConfigError(f"batch_wait_s must be within 0 and 60, got {self.batch_wait_s}")
        if self.backoff_base_s < 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError("backoff needs 0 <= backoff_base_s <= backoff_cap_s")
        self._check_levels()
        if self.priorities and self.partitions > 1:
            raise ConfigError("a queue has priorities or partitions > 1, not both")

    def _check_levels(self) -> None:
        levels = self.priorities
        if not levels:
            if self.priority_weights or self.default_priority:
                raise ConfigError("priority_weights and default_priority need priorities")
            return
        bad = [x for x in levels if not _LEVEL.fullmatch(x) or x in RESERVED_LEVELS]
        if len(levels) < 2 or len(set(levels)) != len(levels) or bad:
            raise ConfigError(
                f"priorities {list(levels)}: two or more distinct names of a-z, 0-9, _ and -, "
                f"none of {', '.join(sorted(RESERVED_LEVELS))}"
            )
        weights = self.priority_weights
        if weights and (len(weights) != len(levels) or min(weights) < 1):
            raise ConfigError("priority_weights: one whole number of at least 1 per level")
        if self.default_priority and self.default_priority not in levels:
            raise ConfigError(f"default_priority {self.default_priority!r} is not a level")

    def levels(self) -> list[tuple[str | None, int]]:
        """Each level, highest first, with its weight; the default level is None (it keeps
        the queue's own stream). One level, None, for a queue without priorities."""
        if not self.priorities:
            return [(None, 1)]
        n = len(self.priorities)
        weights = self.priority_weights or tuple(2 ** (n - 1 - i) for i in range(n))
        default = self.default_priority or (
            "normal" if "normal" in self.priorities else self.priorities[-1]
        )
        return [
            (None if level == default else level, w)
            for level, w in zip(self.priorities, weights, strict=True)
        ]


def backoff_s(policy: Policy, attempt: int, rand: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1`, in seconds."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** max(attempt - 1, 0))
    return (rand or random).uniform(0, ceiling)

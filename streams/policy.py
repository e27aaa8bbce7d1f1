"""Per-queue execution policy: attempts, backoff, timeout, concurrency."""

from __future__ import annotations

import random

import msgspec

from jobstream.streams.errors import ConfigError

__all__ = ["Policy", "backoff_s"]


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
    """Jobs of this queue in flight at once in one worker (a batch counts all its jobs)."""
    partitions: int = 1
    """Streams the queue is split into (`jobs:{<queue>}`, then `jobs:{<queue>#<n>}`)."""
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


def backoff_s(policy: Policy, attempt: int, rand: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1`, in seconds."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** max(attempt - 1, 0))
    return (rand or random).uniform(0, ceiling)

"""Every Redis key name, built from the configured prefixes; nobody else concatenates keys.

Each key of a queue carries the queue as its hash tag, so a queue lives in one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobstream.streams.errors import ConfigError

__all__ = ["Keys", "check_queue_name", "queue_of_part"]


def check_queue_name(queue: str) -> str:
    """Refuse names that would break the hash tag or the key layout (`#` marks a partition)."""
    if not queue or len(queue) > 100 or any(c in queue for c in "{}#\r\n "):
        raise ConfigError(f"invalid queue name {queue!r}: 1-100 characters, no braces, # or spaces")
    return queue


def queue_of_part(part: str) -> str:
    """The queue a partition belongs to: `email-sending#3` → `email-sending`."""
    return part.partition("#")[0]


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (`prefix` namespaces streams, `job_prefix` the hashes)."""

    prefix: str = "jobs:"
    job_prefix: str = "job:"

    def stream(self, queue: str) -> str:
        return f"{self.prefix}{{{queue}}}"

    def delayed(self, queue: str) -> str:
        return f"{self.prefix}{{{queue}}}:delayed"

    def dead(self, queue: str) -> str:
        return f"{self.prefix}{{{queue}}}:dead"

    def gauge_lease(self, queue: str) -> str:
        """Which replica exports the queue's gauges (pending, lag, dead letters) now."""
        return f"{self.prefix}{{{queue}}}:gauges"

    @staticmethod
    def part(queue: str, n: int) -> str:
        """Partition `n` of a queue, named as a queue: the queue itself for 0 (so a queue of
        one partition keeps its keys), `<queue>#<n>` after, each tag its own slot."""
        return queue if n == 0 else f"{queue}#{n}"

    def partitions(self, queue: str) -> str:
        """The set of a queue's partition numbers ever used (partition 0 is implied)."""
        return f"{self.prefix}{{{queue}}}:partitions"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def alive(self, consumer: str) -> str:
        return f"{self.prefix}alive:{consumer}"

    def dead_pattern(self) -> str:
        """A SCAN pattern matching every queue's dead-letter stream."""
        return f"{self.prefix}{{*}}:dead"

    def queue_of(self, stream: str) -> str:
        """The queue a stream key belongs to (inverse of `stream`)."""
        return stream[len(self.prefix) + 1 : stream.index("}", len(self.prefix))]

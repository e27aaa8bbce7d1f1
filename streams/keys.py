"""Every Redis key name, built from the configured prefixes; nobody else concatenates keys.

Each key of a queue carries the queue as its hash tag, so a queue lives in one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobstream.streams.errors import ConfigError

__all__ = ["Keys", "check_queue_name"]


def check_queue_name(queue: str) -> str:
    """Refuse names that would break the hash tag or the key layout."""
    if not queue or len(queue) > 100 or any(c in queue for c in "{}\r\n "):
        raise ConfigError(f"invalid queue name {queue!r}: 1-100 characters, no braces or spaces")
    return queue


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

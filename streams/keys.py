"""Every Redis key name, built from the configured prefixes; nobody else concatenates keys.

Each key of a queue carries the queue as its hash tag, so a queue lives in one cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobstream.streams.errors import ConfigError

__all__ = ["Keys", "base_queue", "check_queue_name", "level_of", "level_queue", "queue_of_part"]

_LEVEL = "\x1f"  # joins a queue and a priority level in the engine's name of a level


def check_queue_name(queue: str) -> str:
    """Refuse names that would break the hash tag or the key layout (`#` marks a partition,
    \\x1f a priority level)."""
    if not queue or len(queue) > 100 or any(c in queue for c in "{}#\r\n \x1f"):
        raise ConfigError(f"invalid queue name {queue!r}: 1-100 characters, no braces, # or spaces")
    return queue


def level_queue(queue: str, level: str | None) -> str:
    """The engine's name of one priority level of a queue (the queue itself for its default
    level): what a `Delivery.queue` holds, and what every key method below accepts."""
    return f"{queue}{_LEVEL}{level}" if level else queue


def base_queue(name: str) -> str:
    """The queue a level's or a partition's name belongs to (the name itself when it is a
    queue): `email-sending#3` → `email-sending`. A queue has levels or partitions, never
    both (`Policy`), but either suffix is stripped."""
    return name.partition(_LEVEL)[0].partition("#")[0]


queue_of_part = base_queue
"""The queue a partition belongs to: `email-sending#3` → `email-sending` (and a level's)."""


def level_of(name: str) -> str | None:
    """The priority level a name stands for; None for a queue's default level."""
    return name.partition(_LEVEL)[2] or None


def _unlevel(name: str) -> str:
    """The name without its priority level: a partition keeps its own keys."""
    return name.partition(_LEVEL)[0]


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (`prefix` namespaces streams, `job_prefix` the hashes)."""

    prefix: str = "jobs:"
    job_prefix: str = "job:"

    def stream(self, queue: str) -> str:
        """`jobs:{q}`, or `jobs:{q}:<level>` for a priority level other than the default."""
        base, _, level = queue.partition(_LEVEL)
        return f"{self.prefix}{{{base}}}:{level}" if level else f"{self.prefix}{{{base}}}"

    def delayed(self, queue: str) -> str:
        """Retries and delayed jobs of a queue (of a level: `jobs:{q}:<level>:delayed`)."""
        return f"{self.stream(queue)}:delayed"

    def dead(self, queue: str) -> str:
        """Dead letters of a queue (of a partition), all its levels together."""
        return f"{self.prefix}{{{_unlevel(queue)}}}:dead"

    def cancels(self, queue: str) -> str:
        """The stream of cancellation requests of a queue's jobs (read by every worker)."""
        return f"{self.prefix}{{{base_queue(queue)}}}:cancels"

    def unique(self, queue: str, job_id: str) -> str:
        """The claim that makes a job id unique in its queue for a while."""
        return f"{self.prefix}{{{base_queue(queue)}}}:unique:{job_id}"

    def schedule(self, queue: str, name: str) -> str:
        """The newest occurrence of a schedule published to `queue` (its claim cursor)."""
        return f"{self.prefix}{{{base_queue(queue)}}}:schedule:{name}"

    def gauge_lease(self, queue: str) -> str:
        """Which replica exports the queue's gauges (pending, lag, dead letters) now."""
        return f"{self.prefix}{{{_unlevel(queue)}}}:gauges"

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

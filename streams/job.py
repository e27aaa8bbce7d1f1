"""Records that travel through the engine: a delivered entry, the job a handler sees, a result."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from jobstream.schema.times import entry_parts
from jobstream.streams.lease import clock

__all__ = ["Delivery", "Job", "Outcome", "Result", "fence_of"]


def fence_of(entry_id: str, delivery_count: int) -> str:
    """Orders the deliveries of a job: entry ID, then delivery count (inv. 9).

    Fixed-width digits, so text order is numeric order in Lua, and PostgreSQL reads it
    as a number. A retry or a replay is a newer entry; a reclaim a newer delivery.
    """
    try:
        ms, seq = entry_parts(entry_id)
    except ValueError:  # not an entry ID: orders before any real one
        return "0" * 50
    return f"{ms:020d}{seq:020d}{delivery_count:010d}"


@dataclass(frozen=True, slots=True)
class Job:
    """What a handler knows of its job besides the payload."""

    id: str
    queue: str
    attempt: int
    entry_id: str
    enqueued_at_ms: int
    delivery_count: int = 1
    traceparent: str | None = None

    @property
    def fence(self) -> str:
        """This delivery's place among the job's deliveries (see `fence_of`)."""
        return fence_of(self.entry_id, self.delivery_count)


@dataclass(slots=True)
class Delivery:
    """One entry read from a stream, with how many times Redis has delivered it."""

    queue: str
    entry_id: str
    fields: dict[bytes, bytes]
    delivery_count: int = 1
    started_mono: float = 0.0
    read_at: float = field(default_factory=clock)  # on the lease clock (`jobstream.streams.lease`)

    @property
    def fence(self) -> str:
        """This delivery's place among the job's deliveries (see `fence_of`)."""
        return fence_of(self.entry_id, self.delivery_count)


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"
    SKIPPED = "skipped"  # already completed before this delivery: ack only


@dataclass(slots=True)
class Result:
    """The outcome of one attempt, ready to settle (record, then retry/dead-letter, then ack)."""

    delivery: Delivery
    job_id: str
    attempt: int
    outcome: Outcome
    payload: bytes | None = None
    result_json: str | None = None
    error: str | None = None
    reason: str | None = None  # dead-letter reason: exhausted, permanent, invalid, deliveries
    started_at: float = 0.0  # epoch seconds
    finished_at: float = 0.0
    duration_ms: int = 0
    retry_at: float | None = None  # epoch seconds of the next attempt
    retry_fields: dict[str, str] = field(default_factory=dict)
    executed: bool = True  # False: the handler never ran (invalid entry, skipped)
    exception: BaseException | None = None
    view: Any = None  # SKIPPED: the terminal row PostgreSQL has, to repair the hash from

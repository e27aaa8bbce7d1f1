"""Records that travel through the engine: a delivered entry, the job a handler sees, a result."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobstream.schema.times import entry_parts
from jobstream.streams.lease import clock
from jobstream.streams.status import Outcome, Reason

if TYPE_CHECKING:
    from jobstream.streams.progress import Reporter

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
    reporter: Reporter | None = field(default=None, repr=False, compare=False)

    @property
    def fence(self) -> str:
        """This delivery's place among the job's deliveries (see `fence_of`)."""
        return fence_of(self.entry_id, self.delivery_count)

    def progress(self, fraction: float, note: str = "") -> None:
        """Say how far the job has come: `fraction` from 0.0 to 1.0, and a short note.

        Costs no round trip: the latest value rides the worker's next flush to the job's
        hash (at most `progress_interval_s` late), and each call is an event on the job's
        span. Raises ValueError for a fraction outside 0..1.
        """
        if self.reporter is not None:
            self.reporter.report(fraction, note)
        else:  # not run by an engine (a test, a direct call): checked all the same
            from jobstream.streams.progress import check_progress

            check_progress(fraction, note)


@dataclass(slots=True)
class Delivery:
    """One entry read from a stream, with how many times Redis has delivered it."""

    queue: str
    entry_id: str
    fields: dict[bytes, bytes]
    delivery_count: int = 1
    started_mono: float = 0.0
    read_at: float = field(default_factory=clock)  # on the lease clock (`jobstream.streams.lease`)
    cancel_requested: bool = False  # an operator cancelled its job: its task is cancelled
    payload_stored: bool = False  # a row with this delivery's payload reached PostgreSQL
    task: asyncio.Task[None] | None = None  # the task running it alone, for the watchdog
    timed_out: bool = False  # the watchdog cancelled its task: its time was up
    _fence: tuple[int, str] = field(default=(0, ""), init=False, repr=False)

    @property
    def fence(self) -> str:
        """This delivery's place among the job's deliveries (see `fence_of`); formatted
        once per delivery count (several records of a job ask for it)."""
        count, fence = self._fence
        if count != self.delivery_count or not fence:
            fence = fence_of(self.entry_id, self.delivery_count)
            self._fence = (self.delivery_count, fence)
        return fence


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one attempt, ready to settle (record, then retry/dead-letter, then ack).

    Immutable: built by `completed`, `retry`, `failed` or `skipped`; a settlement that must
    change one makes a new one (`dataclasses.replace`).
    """

    delivery: Delivery
    job_id: str
    attempt: int
    outcome: Outcome
    payload: bytes | None = None
    result_json: str | None = None
    error: str | None = None
    reason: Reason | None = None  # FAILED only: why it is dead-lettered
    started_at: float = 0.0  # epoch seconds
    finished_at: float = 0.0
    duration_ms: int = 0
    retry_at: float | None = None  # epoch seconds of the next attempt
    retry_fields: dict[str, str] = field(default_factory=dict)
    executed: bool = True  # False: the handler never ran (invalid entry, skipped)
    exception: BaseException | None = None
    view: Any = None  # SKIPPED: the terminal row PostgreSQL has, to repair the hash from
    trace_id: str | None = None  # 32 hex digits: the trace this attempt ran in, if any

    @classmethod
    def completed(
        cls,
        d: Delivery,
        job: Job,
        *,
        payload: bytes,
        result_json: str | None,
        started_at: float,
        finished_at: float,
        duration_ms: int,
    ) -> Result:
        """The handler returned: record `result_json`, then ack."""
        return cls(
            d, job.id, job.attempt, Outcome.COMPLETED, payload, result_json,
            started_at=started_at, finished_at=finished_at, duration_ms=duration_ms,
        )  # fmt: skip

    @classmethod
    def retry(
        cls,
        d: Delivery,
        job: Job,
        *,
        payload: bytes,
        error: str,
        exception: BaseException,
        started_at: float,
        finished_at: float,
        duration_ms: int,
        retry_at: float,
        retry_fields: dict[str, str],
    ) -> Result:
        """The attempt failed and may succeed later: attempt + 1 at `retry_at`, then ack."""
        return cls(
            d, job.id, job.attempt, Outcome.RETRYING, payload, error=error, exception=exception,
            started_at=started_at, finished_at=finished_at, duration_ms=duration_ms,
            retry_at=retry_at, retry_fields=retry_fields,
        )  # fmt: skip

    @classmethod
    def failed(
        cls,
        d: Delivery,
        job_id: str,
        attempt: int,
        *,
        reason: Reason,
        error: str,
        started_at: float,
        finished_at: float,
        duration_ms: int = 0,
        payload: bytes | None = None,
        exception: BaseException | None = None,
        executed: bool = True,
    ) -> Result:
        """No attempt can succeed: record `failed`, dead-letter with `reason`, then ack.

        `executed=False`: no handler ran (an invalid entry), so no execution is recorded.
        """
        return cls(
            d, job_id, attempt, Outcome.FAILED, payload, error=error, reason=reason,
            exception=exception, executed=executed,
            started_at=started_at, finished_at=finished_at, duration_ms=duration_ms,
        )  # fmt: skip

    @classmethod
    def skipped(cls, d: Delivery, job_id: str, view: Any, at: float) -> Result:
        """Already over (`view`: its terminal row): repair the hash from it, then ack."""
        return cls(
            d, job_id, 0, Outcome.SKIPPED, started_at=at, finished_at=at, executed=False, view=view
        )

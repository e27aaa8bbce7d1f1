"""The dashboard API's shapes: one msgspec struct per response and request body.

The structs are the single source of truth: responses are encoded from them and the
OpenAPI description (`api.openapi`) is generated from them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from jobstream.streams.lookup import Waiting

__all__ = [
    "CURSOR_PATTERN",
    "DEAD_ID_PATTERN",
    "MODELS",
    "QUEUE_PATTERN",
    "ChartPoint",
    "DeadLetterDetail",
    "DeadLetterSummary",
    "DeadPage",
    "DeadQueue",
    "Error",
    "Execution",
    "Held",
    "JobDetail",
    "JobRecord",
    "JobSummary",
    "JobsPage",
    "PurgeRequest",
    "PurgeResult",
    "QueueInfo",
    "QueuesPage",
    "Refused",
    "ReplayRequest",
    "ReplayResult",
    "Replayed",
    "Waiting",
    "Worker",
    "WorkersPage",
]


QUEUE_PATTERN = r"^[^{}#\r\n \x1f]{1,100}$"  # streams.check_queue_name
CURSOR_PATTERN = r"^[0-9]{1,18}~[^\x00]*$"


class Error(msgspec.Struct, frozen=True, kw_only=True):
    error: str


class ChartPoint(msgspec.Struct, frozen=True, kw_only=True):
    """Attempts that finished in one minute of the last hour, by outcome."""

    minute: dt.datetime
    completed: int
    retried: int
    failed: int


class QueueInfo(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    handled: bool
    length: int
    pending: int
    lag: int
    consumers: int
    """Consumers of the group with a live heartbeat."""
    stale_consumers: int = 0
    """Consumers of the group without one (gone, or not yet taken over)."""
    oldest_pending_age_s: float | None
    delayed: int
    dead: int
    jobs: dict[str, int]
    """Jobs in PostgreSQL by status."""
    jobs_per_s: float
    """Attempts finished per second over the last `window_s`."""
    chart: list[ChartPoint]


class QueuesPage(msgspec.Struct, frozen=True, kw_only=True):
    window_s: int
    queues: list[QueueInfo]


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    queue: str
    status: str
    attempts: int
    error: str | None
    """The first 200 characters."""
    created_at: dt.datetime
    updated_at: dt.datetime
    trace_id: str | None


class JobsPage(msgspec.Struct, frozen=True, kw_only=True):
    jobs: list[JobSummary]
    next: str | None
    """Pass as `before` for the next (older) page; null on the last page."""


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    queue: str
    status: str
    payload: Any
    result: Any
    error: str | None
    attempts: int
    worker_id: str | None
    stream_entry_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    updated_at: dt.datetime
    next_attempt_at: dt.datetime | None
    trace_id: str | None = None


class Execution(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    outcome: str
    error: str | None
    duration_ms: int
    worker_id: str
    started_at: dt.datetime
    finished_at: dt.datetime


class JobDetail(msgspec.Struct, frozen=True, kw_only=True):
    job: JobRecord | None
    executions: list[Execution]
    hash: dict[str, str]
    waiting: list[Waiting]
    complete: bool
    """False when a long stream was searched only in part."""
    trace_id: str | None
    trace_url: str | None
    """The job's trace in the trace viewer (`JOBSTREAM_TRACE_URL`), when both are known."""


class DeadQueue(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    count: int


class DeadLetterSummary(msgspec.Struct, frozen=True, kw_only=True):
    dead_id: str
    queue: str
    job_id: str | None
    reason: str | None
    attempts: str | None
    failed_at: str | None
    error: str | None
    """The first 200 characters."""
    replayable: bool


class DeadPage(msgspec.Struct, frozen=True, kw_only=True):
    queues: list[DeadQueue]
    queue: str | None
    letters: list[DeadLetterSummary]
    next: str | None


class DeadLetterDetail(msgspec.Struct, frozen=True, kw_only=True):
    dead_id: str
    queue: str
    fields: dict[str, str]
    replayable: bool
    why_not: str | None


DEAD_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"  # each part fits 64 bits
DeadId = Annotated[str, msgspec.Meta(pattern=DEAD_ID_PATTERN)]


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True):
    ids: Annotated[list[DeadId], msgspec.Meta(min_length=1, max_length=1000)]
    """Dead-letter ids, e.g. 1764496800000-0."""


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    dead_id: str
    entry_id: str
    job_id: str | None


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    dead_id: str
    why: str


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    replayed: list[Replayed]
    gone: list[str]
    """Letters already replayed or purged by someone else."""
    refused: list[Refused]


class PurgeRequest(msgspec.Struct, frozen=True, kw_only=True):
    confirm: Literal[True]
    """Must be true: purging deletes dead letters for good."""
    older_than: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}[smhd]$")] | None = None
    """Only letters older than this: 30s, 15m, 12h, 7d."""


class PurgeResult(msgspec.Struct, frozen=True, kw_only=True):
    purged: int


class Held(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    entry_id: str
    job_id: str | None
    idle_ms: int
    deliveries: int


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    """What `jobstream workers` shows of a consumer, and the entries it holds."""

    consumer: str
    live: bool
    """Its heartbeat key exists (it expires unless the worker refreshes it)."""
    heartbeat_age_s: float | None
    in_flight: int
    """Jobs it was running at its last heartbeat."""
    pending: int
    """Entries delivered to it and not yet acknowledged, over all queues."""
    idle_s: float | None
    pid: int | None
    host: str | None
    queues: list[str]
    held: list[Held]
    """Up to 20 of the entries it holds, per queue."""


class WorkersPage(msgspec.Struct, frozen=True, kw_only=True):
    workers: list[Worker]


MODELS: tuple[type[msgspec.Struct], ...] = (
    Error,
    QueuesPage,
    JobsPage,
    JobDetail,
    DeadPage,
    DeadLetterDetail,
    ReplayRequest,
    ReplayResult,
    PurgeRequest,
    PurgeResult,
    WorkersPage,
)

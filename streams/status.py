"""The vocabulary of a job's life, in one place: the status PostgreSQL and the Redis hash
hold, the outcome of one attempt, and why a job was dead-lettered.

Lua scripts and SQL text spell the same values; Python code compares against these.
"""

from __future__ import annotations

import enum

__all__ = ["TERMINAL", "Outcome", "Reason", "Status"]


class Status(enum.StrEnum):
    """A job's status (`jobs.status`, the hash's `status`)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class Outcome(enum.StrEnum):
    """The outcome of one delivery (`job_executions.outcome`, the metrics' `outcome`)."""

    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"
    SKIPPED = "skipped"  # already completed before this delivery: ack only
    CANCELLED = "cancelled"  # cancelled by request: recorded, acked, never retried


class Reason(enum.StrEnum):
    """Why a job was dead-lettered (the dead letter's `reason`)."""

    PERMANENT = "permanent"  # PermanentError, or input that can never succeed
    EXHAUSTED = "exhausted"  # max_attempts used up
    INVALID = "invalid"  # the entry could not be decoded or routed
    DELIVERIES = "deliveries"  # delivered more than max_deliveries times: it crashes workers
    UNRECORDABLE = "unrecordable"  # PostgreSQL refused its record
    CANCELLED = "cancelled"  # cancelled by request (not dead-lettered: recorded, acked)

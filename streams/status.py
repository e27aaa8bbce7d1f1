"""The one status vocabulary shared by PostgreSQL and the Redis hash."""

from __future__ import annotations

import enum

__all__ = ["TERMINAL", "Status"]


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

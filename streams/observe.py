"""Hooks through which the engine reports what it does (metrics live outside the engine)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullObserver", "Observer"]


class Observer(Protocol):
    """Called on the hot path: implementations must be cheap and must never raise."""

    def job_started(self, queue: str) -> None: ...

    def job_finished(self, queue: str, outcome: str, duration_s: float) -> None:
        """`outcome`: completed, retrying, failed or skipped."""

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        """Refreshed every trim interval from the consumer group and the dead stream."""

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        """`count` dead letters removed by a cap: `age`, `entries` or `bytes`."""


class NullObserver:
    """Observes nothing."""

    def job_started(self, queue: str) -> None:
        return None

    def job_finished(self, queue: str, outcome: str, duration_s: float) -> None:
        return None

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        return None

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        return None

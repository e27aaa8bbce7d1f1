"""Hooks through which the engine reports what it does (metrics live outside the engine)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["NullObserver", "Observer"]


class Observer(Protocol):
    """Called on the hot path: implementations must be cheap and must never raise."""

    def serving(self, streams: Mapping[str, str], group: str) -> None:
        """The queues an engine serves (queue → stream key) through `group`; called once,
        before any job, so every series of these queues can exist from the start."""

    def job_started(self, queue: str) -> None:
        """An entry was delivered to the application (once per delivery, run or not)."""

    def job_finished(
        self, queue: str, outcome: str, duration_s: float, error_type: str | None = None
    ) -> None:
        """`outcome`: completed, retrying, failed or skipped; `error_type` when it failed."""

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        """Refreshed every trim interval by the one replica that holds the queue's lease."""

    def queue_stats_withdrawn(self, queue: str) -> None:
        """Another replica reports the queue's gauges now: stop exporting them here."""

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        """`count` dead letters removed by a cap: `age`, `entries` or `bytes`."""

    def messages_sent(self, queue: str, stream: str, count: int, error_type: str | None) -> None:
        """`count` entries published to `stream` (`error_type`: the write failed)."""


class NullObserver:
    """Observes nothing."""

    def serving(self, streams: Mapping[str, str], group: str) -> None:
        return None

    def job_started(self, queue: str) -> None:
        return None

    def job_finished(
        self, queue: str, outcome: str, duration_s: float, error_type: str | None = None
    ) -> None:
        return None

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        return None

    def queue_stats_withdrawn(self, queue: str) -> None:
        return None

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        return None

    def messages_sent(self, queue: str, stream: str, count: int, error_type: str | None) -> None:
        return None

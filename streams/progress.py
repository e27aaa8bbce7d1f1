"""Progress that handlers report: the latest value per job, coalesced into the recorder's
flush (no round trip per call), and each call as an event on the job's span."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from jobstream.schema.times import utc_iso
from jobstream.streams.keys import Keys

if TYPE_CHECKING:
    from jobstream.streams.job import Delivery

__all__ = ["MAX_NOTE", "ProgressBuffer", "Reporter", "check_progress"]

MAX_NOTE = 200
"""A progress note is cut to this many characters."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_progress(fraction: float, note: str) -> tuple[float, str]:
    """The fraction as a float within 0..1 and the note, one line and bounded.

    Raises ValueError for a fraction that is not a number from 0 to 1.
    """
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"progress must be a number from 0 to 1, not {fraction!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be a number from 0 to 1, not {fraction!r}")
    return value, _CONTROL.sub(" ", str(note))[:MAX_NOTE]


class ProgressBuffer:
    """The latest progress of each running job of one worker, until the next flush.

    `wake()` is called (at most once per `interval_s`) when values wait, so a job that
    reports progress while nothing else is flushed still shows it within `interval_s`.
    """

    def __init__(self, keys: Keys, interval_s: float, wake: Callable[[], None]) -> None:
        self._keys = keys
        self._interval_s = interval_s
        self._wake = wake
        self._latest: dict[str, tuple[str, float, str, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.due = False

    def reporter(self, job_id: str, delivery: Delivery) -> Reporter:
        return Reporter(self, job_id, delivery)

    def put(self, job_id: str, fence: str, fraction: float, note: str, at: float) -> None:
        self._latest[job_id] = (fence, fraction, note, at)
        if self._timer is None and not self.due:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._ready)

    def _ready(self) -> None:
        self._timer = None
        if self._latest:
            self.due = True
            self._wake()

    def take(self, script_sha: bytes, *, per_job: bool = False) -> list[tuple[Any, ...]]:
        """The EVALSHA commands writing every waiting value (none when none waits): one
        for all, or with `per_job` one per job (on a cluster a script touches one slot,
        and the job hashes are spread over every slot)."""
        self.due = False
        if not self._latest:
            return []
        latest, self._latest = self._latest, {}
        keys: list[str] = []
        args: list[Any] = []
        cmds: list[tuple[Any, ...]] = []
        for job_id, (fence, fraction, note, at) in latest.items():
            one = (fence, f"{fraction:.4g}", note, utc_iso(at))
            if per_job:
                cmds.append(("EVALSHA", script_sha, 1, self._keys.job(job_id), *one))
            else:
                keys.append(self._keys.job(job_id))
                args += one
        if keys:
            cmds.append(("EVALSHA", script_sha, len(keys), *keys, *args))
        return cmds


class Reporter:
    """One delivery's progress: what `Job.progress` calls."""

    __slots__ = ("_buffer", "delivery", "job_id", "span")

    def __init__(self, buffer: ProgressBuffer, job_id: str, delivery: Delivery) -> None:
        self._buffer = buffer
        self.job_id = job_id
        self.delivery = delivery
        self.span: trace.Span | None = None  # the job's CONSUMER span, when traced

    def report(self, fraction: float, note: str = "") -> None:
        value, text = check_progress(fraction, note)
        span = self.span
        if span is not None and span.is_recording():
            span.add_event("progress", {"jobstream.progress": value, "jobstream.note": text})
        self._buffer.put(self.job_id, self.delivery.fence, value, text, time.time())

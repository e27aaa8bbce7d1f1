"""The scheduler loop that every worker replica runs: publish each due occurrence once.

No leader: every replica reads the due schedules from PostgreSQL and publishes their
occurrences oldest first through one script per occurrence that moves the schedule's
cursor in Redis (the queue's slot) and writes the entry together. A replica that finds the
cursor at or past an occurrence publishes nothing, so each occurrence is one entry however
many replicas run, and a replica that dies mid-way leaves the rest to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

import asyncpg

from jobstream.streams.keys import Keys
from jobstream.streams.publisher import mark_queued
from jobstream.streams.redis_client import AnyRedis
from jobstream.streams.schedules import Schedule, due_occurrences, list_schedules, occurrence_id

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)
_CLAIM_LUA = (
    resources.files("jobstream.streams.lua").joinpath("schedule_claim.lua").read_text("utf-8")
)

ADVANCE_SQL = """
UPDATE schedules SET next_run_at = $3,
    last_job_id = CASE WHEN $4::timestamptz > coalesce(last_run_at, '-infinity')
                       THEN $5 ELSE last_job_id END,
    last_run_at = greatest(last_run_at, $4::timestamptz),
    updated_at = now()
WHERE name = $1 AND next_run_at = $2 AND NOT paused
"""
DUE_SQL = "SELECT 1 FROM schedules WHERE NOT paused AND next_run_at <= $1 LIMIT 1"


class Scheduler:
    """Publishes due occurrences of every schedule; `run` until `stopping` is set."""

    def __init__(
        self,
        redis: AnyRedis,
        pool: asyncpg.Pool,
        keys: Keys,
        *,
        interval_s: float = 0.5,
        grace_s: float = 60.0,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._claim = redis.register_script(_CLAIM_LUA)
        self.published = 0

    async def run(self, stopping: asyncio.Event) -> None:
        failing = False
        while not stopping.is_set():
            try:
                await self.tick()
                failing = False
            except Exception as exc:
                # A maintenance loop (one of the sanctioned broad catches): a store that is
                # down or a bad schedule must not stop it; logged once until it works again.
                if not failing:
                    logger.warning("scheduler: %s: %s (retrying)", type(exc).__name__, exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._interval_s)

    async def tick(self) -> int:
        """Publish what is due now; return how many entries this replica wrote."""
        now = self._clock()
        if await self._pool.fetchval(DUE_SQL, now) is None:  # the usual case: one cheap query
            return 0
        n = 0
        for s in await list_schedules(self._pool):
            if not s.paused and s.next_run_at is not None and s.next_run_at <= now:
                n += await self._run_one(s, now)
        return n

    async def _run_one(self, s: Schedule, now: dt.datetime) -> int:
        plan, resume = due_occurrences(s, now, self._grace_s)
        n, last = 0, None
        for when in plan:
            job_id = occurrence_id(s.name, when)
            fields = ["id", job_id, "payload", s.payload, "schedule", s.name]
            ms = int(when.timestamp() * 1000)
            reply: Any = await self._claim(
                keys=[self._keys.schedule(s.queue, s.name), self._keys.stream(s.queue)],
                args=[ms, *fields],
            )
            if int(reply[0]) == 1:
                n += 1
                logger.info("schedule %s published %s to %s", s.name, job_id, s.queue)
                await mark_queued(self._redis, self._keys, job_id, s.queue)
            last = when
        if resume != s.next_run_at:
            last_id = occurrence_id(s.name, last) if last is not None else None
            await self._pool.execute(ADVANCE_SQL, s.name, s.next_run_at, resume, last, last_id)
        self.published += n
        return n

"""The producer's API: publish typed payloads and follow jobs to their end.

A `Client` wraps a `Publisher` (validation, one round trip per batch, trace context) and
reads a job's state from its Redis hash (the live view), or from PostgreSQL (the truth)
when it is given a pool and the hash has expired or was never written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import msgspec

from jobstream.schema.text import as_text
from jobstream.streams.errors import PublishError
from jobstream.streams.keys import Keys
from jobstream.streams.policy import Policy
from jobstream.streams.publisher import Publisher
from jobstream.streams.redis_client import AnyRedis
from jobstream.streams.status import TERMINAL, Status

__all__ = ["Client", "JobState"]

JOB_SQL = """
SELECT queue, status, attempts, result::text AS result, error,
       to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS updated_at
FROM jobs WHERE id = $1 ORDER BY created_at DESC LIMIT 1
"""


class JobState(msgspec.Struct, frozen=True, kw_only=True):
    """Where a job stands: one of the `Status` values, and its result or error once over."""

    id: str
    queue: str
    status: Status
    attempt: int
    result: Any = None
    """The handler's return value (decoded JSON), once `completed`."""
    error: str | None = None
    updated_at: str | None = None
    """ISO-8601 UTC time of the last change."""

    @property
    def done(self) -> bool:
        """True once the job is `completed` or `failed` (it will not change again)."""
        return self.status in TERMINAL


class Client:
    """Publish jobs and follow them.

    `payloads` maps each queue to its payload struct; a payload whose struct serves exactly
    one queue needs no queue name. Safe to share between tasks.
    """

    def __init__(
        self,
        redis: AnyRedis,
        payloads: Mapping[str, type[msgspec.Struct]],
        keys: Keys | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        partitions: Mapping[str, int] | None = None,
        priorities: Mapping[str, Policy] | None = None,
    ) -> None:
        """`partitions`: queue → partitions, as the workers' policies say (default 1)."""
        self._redis = redis
        self._keys = keys or Keys()
        self._pool = pool
        self._publisher = Publisher(
            redis, self._keys, payloads, partitions=partitions, priorities=priorities
        )
        self._queues: dict[type[msgspec.Struct], list[str]] = {}
        for queue, struct in payloads.items():
            self._queues.setdefault(struct, []).append(queue)

    def queue_of(self, payload: msgspec.Struct) -> str:
        """The one queue that takes this payload's struct; PublishError when none or many."""
        queues = self._queues.get(type(payload), [])
        if len(queues) == 1:
            return queues[0]
        name = type(payload).__name__
        if not queues:
            raise PublishError(f"no queue takes {name} payloads")
        raise PublishError(f"{name} payloads go to several queues ({', '.join(queues)}): name one")

    async def publish(
        self,
        payload: msgspec.Struct,
        *,
        queue: str | None = None,
        job_id: str | None = None,
        delay_s: float | None = None,
        key: str | None = None,
        unique_for_s: float | None = None,
        priority: str | None = None,
    ) -> str:
        """Publish one job (after `delay_s` seconds if given); return its job id.

        `key` picks the partition of a partitioned queue (one key's jobs keep their order).
        With `unique_for_s` (and a `job_id`), an id already published to the queue within
        that many seconds is refused: nothing is written and the existing job's id is
        returned (`Publisher.publish_unique` says which happened). `priority` names one of
        the queue's priority levels (the client needs `priorities=` for it).
        Raises PublishError, writing nothing, for an invalid payload or an unknown queue.
        """
        return await self._publisher.publish(
            queue or self.queue_of(payload),
            payload,
            job_id,
            delay_s=delay_s,
            key=key,
            unique_for_s=unique_for_s,
            priority=priority,
        )

    async def publish_many(
        self,
        payloads: Sequence[msgspec.Struct],
        *,
        queue: str | None = None,
        job_ids: Sequence[str | None] | None = None,
        delay_s: float | None = None,
        key: str | None = None,
    ) -> list[str]:
        """Publish a batch of one queue in one round trip; all valid, or nothing written."""
        if not payloads:
            return []
        target = queue or self.queue_of(payloads[0])
        return await self._publisher.publish_many(
            target, payloads, job_ids, delay_s=delay_s, key=key
        )

    async def get(self, job_id: str) -> JobState | None:
        """The job's state now, or None when neither store knows it."""
        raw: Any = await self._redis.hgetall(self._keys.job(job_id))
        if raw:
            view = {as_text(k): as_text(v) for k, v in raw.items()}
            return JobState(
                id=job_id,
                queue=view.get("queue", ""),
                status=Status(view.get("status", Status.QUEUED)),
                attempt=int(view.get("attempt") or 1),
                result=_decoded(view.get("result")),
                error=view.get("error") or None,
                updated_at=view.get("updated_at") or None,
            )
        if self._pool is None:
            return None
        row = await self._pool.fetchrow(JOB_SQL, job_id)
        if row is None:
            return None
        return JobState(
            id=job_id,
            queue=row["queue"],
            status=Status(row["status"]),
            attempt=row["attempts"],
            result=_decoded(row["result"]),
            error=row["error"],
            updated_at=row["updated_at"],
        )

    async def wait(self, job_id: str, timeout_s: float, *, poll_s: float = 0.05) -> JobState:
        """Wait until the job is `completed` or `failed`; return its final state.

        Raises TimeoutError when it is not over within `timeout_s` seconds.
        """
        deadline = time.monotonic() + timeout_s
        delay = poll_s
        while True:
            state = await self.get(job_id)
            if state is not None and state.done:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                where = "unknown" if state is None else state.status
                raise TimeoutError(f"job {job_id} not over after {timeout_s:g}s ({where})")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)


def _decoded(text: str | None) -> Any:
    if not text:
        return None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text

"""Publishing: validate every payload against its queue's struct, then pipeline the writes.

Nothing is written unless every payload of the call is valid. A bare `XADD` from any
client is equally valid input; this is the convenient and safe way from Python.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from opentelemetry import trace

from jobstream.otel import inject, is_recording_enabled
from jobstream.schema.envelope import job_id_problem
from jobstream.schema.text import as_text
from jobstream.schema.times import utc_iso
from jobstream.streams.errors import PublishError
from jobstream.streams.keys import Keys
from jobstream.streams.status import Status

__all__ = ["PayloadLike", "Publisher", "new_job_id"]

PayloadLike = msgspec.Struct | Mapping[str, Any] | str | bytes
_tracer = trace.get_tracer("jobstream.publisher")


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, time-ordered in its first 12."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


class Publisher:
    """Publishes jobs to the queues it knows (`payloads`: queue → payload struct).

    The engine knows no queue of its own: the application says which ones exist.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys | None,
        payloads: Mapping[str, type[msgspec.Struct]],
        *,
        record_queued: bool = True,
    ) -> None:
        self._redis = redis
        self._keys = keys or Keys()
        self._payloads = dict(payloads)
        self._record_queued = record_queued

    @property
    def queues(self) -> list[str]:
        return sorted(self._payloads)

    def serving(self, payloads: Mapping[str, type[msgspec.Struct]]) -> Publisher:
        """A publisher like this one (same connection, keys, recording) for `payloads`."""
        if dict(payloads) == self._payloads:
            return self
        return Publisher(self._redis, self._keys, payloads, record_queued=self._record_queued)

    def encode(self, queue: str, payload: PayloadLike) -> bytes:
        """Validate a payload against its queue's struct; return its JSON or raise PublishError."""
        struct = self._payloads.get(queue)
        if struct is None:
            known = ", ".join(self.queues)
            raise PublishError(f"unknown queue {queue!r} (known: {known})")
        try:
            if isinstance(payload, msgspec.Struct):
                if not isinstance(payload, struct):
                    raise PublishError(
                        f"{queue}: expected {struct.__name__}, got {type(payload).__name__}"
                    )
                value = payload
            elif isinstance(payload, str | bytes):
                value = msgspec.json.decode(payload, type=struct)
            else:
                value = msgspec.convert(payload, struct)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise PublishError(f"{queue}: invalid payload: {exc}") from None
        return msgspec.json.encode(value)

    async def publish(
        self,
        queue: str,
        payload: PayloadLike,
        job_id: str | None = None,
        *,
        delay_s: float | None = None,
    ) -> str:
        """Publish one job (after `delay_s` seconds if given); return its job id."""
        ids = await self.publish_many(queue, [payload], [job_id], delay_s=delay_s)
        return ids[0]

    async def publish_many(
        self,
        queue: str,
        payloads: Sequence[PayloadLike],
        job_ids: Sequence[str | None] | None = None,
        *,
        delay_s: float | None = None,
    ) -> list[str]:
        """Publish a batch in one round trip; validate all first, so a bad one writes nothing."""
        if job_ids is not None and len(job_ids) != len(payloads):
            raise PublishError("job_ids and payloads differ in length")
        if delay_s is not None and not (math.isfinite(delay_s) and 0 <= delay_s <= 366 * 86400):
            raise PublishError(f"delay of {delay_s} s: use 0 to 31622400 seconds")
        bodies = [self.encode(queue, p) for p in payloads]
        ids = [i or new_job_id() for i in (job_ids or [None] * len(bodies))]
        for job_id in ids:
            problem = job_id_problem(job_id)
            if problem is not None:
                raise PublishError(f"job id {problem}")
        stream = self._keys.stream(queue)
        if not is_recording_enabled():
            await self._write(queue, bodies, ids, {}, delay_s)
            return ids
        attributes: dict[str, str | int] = {
            "messaging.system": "redis",
            "messaging.operation.type": "send",
            "messaging.destination.name": stream,
            "messaging.batch.message_count": len(bodies),
        }
        if len(ids) == 1:  # so a job's id finds its producer span too
            attributes["messaging.message.conversation_id"] = ids[0]
        with _tracer.start_as_current_span(
            f"send {stream}", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ):
            context: dict[str, str] = {}
            inject(context)
            await self._write(queue, bodies, ids, context, delay_s)
        return ids

    async def _write(
        self,
        queue: str,
        bodies: list[bytes],
        ids: list[str],
        context: dict[str, str],
        delay_s: float | None,
    ) -> None:
        pipe = self._redis.pipeline(transaction=False)
        due_ms = int((time.time() + delay_s) * 1000) if delay_s else None
        now = utc_iso(time.time())
        for body, job_id in zip(bodies, ids, strict=True):
            fields: dict[str, str | bytes] = {"id": job_id, "payload": body, **context}
            if self._record_queued:  # before the entry exists, so it never hides a later status
                status = {
                    "status": Status.QUEUED.value,
                    "queue": queue,
                    "attempt": 1,
                    "updated_at": now,
                }
                pipe.hset(self._keys.job(job_id), mapping=status)  # type: ignore[arg-type]
            if due_ms is None:
                pipe.xadd(self._keys.stream(queue), fields)  # type: ignore[arg-type]
            else:
                fields["attempt"] = "1"
                member = msgspec.json.encode({k: as_text(v) for k, v in fields.items()})
                pipe.zadd(self._keys.delayed(queue), {member: due_ms})
        await pipe.execute()

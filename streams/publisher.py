"""Publishing: validate every payload against its queue's struct, then pipeline the writes.

Nothing is written unless every payload of the call is valid. A bare `XADD` from any
client is equally valid input; this is the convenient and safe way from Python.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
import redis.asyncio as aioredis
from opentelemetry import trace

from jobstream.otel import inject, is_recording_enabled
from jobstream.schema.envelope import job_id_problem
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams.errors import PublishError
from jobstream.streams.keys import Keys, base_queue, level_queue
from jobstream.streams.policy import Policy

__all__ = ["PayloadLike", "Published", "Publisher", "new_job_id"]

PayloadLike = msgspec.Struct | Mapping[str, Any] | str | bytes
_tracer = trace.get_tracer("jobstream.publisher")
_UNIQUE_LUA = (
    resources.files("jobstream.streams.lua").joinpath("publish_unique.lua").read_text("utf-8")
)
_SETHASH_LUA = resources.files("jobstream.streams.lua").joinpath("sethash.lua").read_text("utf-8")
_FIRST_FENCE = "0" * 50  # before any delivery's fence: a worker's record always wins
MAX_UNIQUE_S = 366 * 86400


@dataclass(frozen=True, slots=True)
class Published:
    """What a unique publish did: `published` false when the id was taken in the window."""

    job_id: str
    published: bool
    where: str
    """The entry ID written (or, when refused, the one the first publish wrote), or
    `delayed` for a job published with a delay."""


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, time-ordered in its first 12."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


class Publisher:
    """Publishes jobs to the queues it knows (`payloads`: queue → payload struct)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys | None = None,
        payloads: Mapping[str, type[msgspec.Struct]] = PAYLOADS,
        *,
        record_queued: bool = True,
        priorities: Mapping[str, Policy] | None = None,
    ) -> None:
        """`priorities`: the policies of the queues that declare priority levels, so that
        `priority=` publishes to the right stream."""
        self._redis = redis
        self._keys = keys or Keys()
        self._payloads = dict(payloads)
        self._record_queued = record_queued
        self._levels = {
            q: {name: engine for name, (engine, _) in zip(p.priorities, p.levels(), strict=True)}
            for q, p in (priorities or {}).items()
            if p.priorities
        }

    def target(self, queue: str, priority: str | None) -> str:
        """The engine's name of the level a job goes to (the queue itself by default)."""
        if priority is None:
            return queue
        levels = self._levels.get(queue)
        if not levels:
            raise PublishError(f"{queue} has no priority levels")
        if priority not in levels:
            raise PublishError(f"{queue} has no priority {priority!r} (levels: "
                               f"{', '.join(levels)})")  # fmt: skip
        return level_queue(queue, levels[priority])

    @property
    def queues(self) -> list[str]:
        return sorted(self._payloads)

    def encode(self, queue: str, payload: PayloadLike) -> bytes:
        """Validate a payload against its queue's struct; return its JSON or raise PublishError."""
        struct = self._payloads.get(base_queue(queue))
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
        unique_for_s: float | None = None,
        priority: str | None = None,
    ) -> str:
        """Publish one job (after `delay_s` seconds if given); return its job id.

        With `unique_for_s`, a job id already published to this queue within that many
        seconds is not published again: the existing job's id is returned (see
        `publish_unique` to tell the two apart). `priority` names one of the queue's
        priority levels (default: its default level).
        """
        queue = self.target(queue, priority)
        if unique_for_s is not None:
            done = await self.publish_unique(queue, payload, job_id, unique_for_s, delay_s=delay_s)
            return done.job_id
        ids = await self.publish_many(queue, [payload], [job_id], delay_s=delay_s)
        return ids[0]

    async def publish_unique(
        self,
        queue: str,
        payload: PayloadLike,
        job_id: str | None,
        unique_for_s: float,
        *,
        delay_s: float | None = None,
    ) -> Published:
        """Publish one job unless its id was published to `queue` in the last
        `unique_for_s` seconds; atomic in Redis, so of racing producers one publishes.

        Retries and dead-letter replays of the job are not publishes: they never consult
        nor renew the window. Raises PublishError for a missing id or a bad window.
        """
        if not job_id:
            raise PublishError("a unique job needs its job id")
        if not (math.isfinite(unique_for_s) and 0.001 <= unique_for_s <= MAX_UNIQUE_S):
            raise PublishError(f"unique window of {unique_for_s} s: use 0.001 to {MAX_UNIQUE_S}")
        _check_delay(delay_s)
        body = self.encode(queue, payload)
        problem = job_id_problem(job_id)
        if problem is not None:
            raise PublishError(f"job id {problem}")
        if not is_recording_enabled():
            return await self._write_unique(queue, body, job_id, {}, unique_for_s, delay_s)
        stream = self._keys.stream(queue)
        with _tracer.start_as_current_span(
            f"send {stream}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": stream,
                "messaging.message.conversation_id": job_id,
            },
        ) as span:
            context: dict[str, str] = {}
            inject(context)
            done = await self._write_unique(queue, body, job_id, context, unique_for_s, delay_s)
            span.set_attribute("jobstream.unique.published", done.published)
            return done

    async def _write_unique(
        self,
        queue: str,
        body: bytes,
        job_id: str,
        context: dict[str, str],
        unique_for_s: float,
        delay_s: float | None,
    ) -> Published:
        fields: dict[str, str | bytes] = {"id": job_id, "payload": body, **context}
        window_ms = max(1, round(unique_for_s * 1000))
        args: list[Any]
        if delay_s:
            fields["attempt"] = "1"
            member = msgspec.json.encode({k: _text(v) for k, v in fields.items()})
            due = str(int((time.time() + delay_s) * 1000))
            target, args = self._keys.delayed(queue), [window_ms, due, member]
        else:  # an entry's fields, flat
            flat = [x for kv in fields.items() for x in kv]
            target, args = self._keys.stream(queue), [window_ms, "", "", *flat]
        reply: Any = await self._redis.eval(
            _UNIQUE_LUA, 2, self._keys.unique(queue, job_id), target, *args
        )
        published, where = bool(int(reply[0])), _text(reply[1])
        if published and self._record_queued:
            await mark_queued(self._redis, self._keys, job_id, base_queue(queue))
        return Published(job_id, published, where)

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
        _check_delay(delay_s)
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
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for body, job_id in zip(bodies, ids, strict=True):
            fields: dict[str, str | bytes] = {"id": job_id, "payload": body, **context}
            if self._record_queued:  # before the entry exists, so it never hides a later status
                status = {"status": "queued", "queue": base_queue(queue), "attempt": 1,
                          "updated_at": now}  # fmt: skip
                pipe.hset(self._keys.job(job_id), mapping=status)  # type: ignore[arg-type]
            if due_ms is None:
                pipe.xadd(self._keys.stream(queue), fields)  # type: ignore[arg-type]
            else:
                fields["attempt"] = "1"
                member = msgspec.json.encode({k: _text(v) for k, v in fields.items()})
                pipe.zadd(self._keys.delayed(queue), {member: due_ms})
        await pipe.execute()


def _check_delay(delay_s: float | None) -> None:
    if delay_s is not None and not (math.isfinite(delay_s) and 0 <= delay_s <= 366 * 86400):
        raise PublishError(f"delay of {delay_s} s: use 0 to 31622400 seconds")


async def mark_queued(redis: aioredis.Redis, keys: Keys, job_id: str, queue: str) -> None:
    """Show a job `queued` in its hash, written after its entry: under the lowest fence,
    so it never hides what a worker has recorded meanwhile."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fields = ["status", "queued", "queue", queue, "attempt", "1", "updated_at", now]
    await redis.eval(_SETHASH_LUA, 1, keys.job(job_id), _FIRST_FENCE, 0, 0, len(fields), *fields)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

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
import redis.exceptions
from opentelemetry import trace

from jobstream.otel import inject, is_recording_enabled
from jobstream.schema.envelope import job_id_problem
from jobstream.schema.text import as_text
from jobstream.schema.times import utc_iso
from jobstream.streams import semconv as sc
from jobstream.streams.errors import PublishError
from jobstream.streams.keys import Keys, base_queue, level_queue
from jobstream.streams.observe import NullObserver, Observer
from jobstream.streams.policy import Policy
from jobstream.streams.queue_partitions import Chooser
from jobstream.streams.redis_client import AnyRedis, wait_replicas
from jobstream.streams.status import Status

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
    """Publishes jobs to the queues it knows (`payloads`: queue → payload struct).

    The engine knows no queue of its own: the application says which ones exist.
    """

    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys | None,
        payloads: Mapping[str, type[msgspec.Struct]],
        *,
        record_queued: bool = True,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        partitions: Mapping[str, int] | None = None,
        observer: Observer | None = None,
        priorities: Mapping[str, Policy] | None = None,
    ) -> None:
        """`wait_replicas` > 0: a publish succeeds only once that many replicas confirmed
        its writes (Redis `WAIT`, at most `wait_timeout_ms`); else it raises PublishError
        (the jobs were written and may run: publishing again is safe, only never lost).
        `priorities`: the policies of the queues that declare priority levels, so that
        `priority=` publishes to the right stream."""
        self._redis = redis
        self._wait = (wait_replicas, wait_timeout_ms)
        # `partitions`: queue → P (policy `partitions`); a queue not named has one.
        self._partitions = dict(partitions or {})
        self._chooser = Chooser()
        self._registered: set[str] = set()
        self._keys = keys or Keys()
        self._payloads = dict(payloads)
        self._record_queued = record_queued
        self._observer: Observer = observer or NullObserver()
        self._server = sc.server_attributes(redis)
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

    def serving(
        self,
        payloads: Mapping[str, type[msgspec.Struct]],
        partitions: Mapping[str, int] | None = None,
    ) -> Publisher:
        """A publisher like this one (same connection, keys, options) for `payloads`
        (and their `partitions`, else this one's)."""
        parts = self._partitions if partitions is None else dict(partitions)
        if dict(payloads) == self._payloads and parts == self._partitions:
            return self
        replicas, timeout_ms = self._wait
        return Publisher(
            self._redis, self._keys, payloads, record_queued=self._record_queued,
            wait_replicas=replicas, wait_timeout_ms=timeout_ms, partitions=parts,
            observer=self._observer,
        )  # fmt: skip

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
        key: str | None = None,
        unique_for_s: float | None = None,
        priority: str | None = None,
    ) -> str:
        """Publish one job (after `delay_s` seconds if given); return its job id.

        `key` (e.g. a mailbox id) picks the partition of a partitioned queue, so jobs of one
        key keep their order; without one, partitions take turns. With `unique_for_s`, a
        job id already published to this queue within that many seconds is not published
        again: the existing job's id is returned (see `publish_unique` to tell the two
        apart); a unique job of a partitioned queue goes to its partition 0, where its
        claim is. `priority` names one of the queue's priority levels (default: its
        default level).
        """
        queue = self.target(queue, priority)
        if unique_for_s is not None:
            done = await self.publish_unique(queue, payload, job_id, unique_for_s, delay_s=delay_s)
            return done.job_id
        ids = await self._publish(queue, [payload], [job_id], delay_s, key, batch=False)
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
                sc.SYSTEM: "redis",
                sc.OPERATION_NAME: "send",
                sc.OPERATION_TYPE: "send",
                sc.DESTINATION: stream,
                sc.CONVERSATION_ID: job_id,
                **self._server,
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
            member = msgspec.json.encode({k: as_text(v) for k, v in fields.items()})
            due = str(int((time.time() + delay_s) * 1000))
            target, args = self._keys.delayed(queue), [window_ms, due, member]
        else:  # an entry's fields, flat
            flat = [x for kv in fields.items() for x in kv]
            target, args = self._keys.stream(queue), [window_ms, "", "", *flat]
        reply: Any = await self._redis.eval(
            _UNIQUE_LUA, 2, self._keys.unique(queue, job_id), target, *args
        )
        published, where = bool(int(reply[0])), as_text(reply[1])
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
        key: str | None = None,
    ) -> list[str]:
        """Publish a batch in one round trip; validate all first, so a bad one writes nothing."""
        return await self._publish(queue, payloads, job_ids, delay_s, key, batch=True)

    async def _publish(
        self,
        queue: str,
        payloads: Sequence[PayloadLike],
        job_ids: Sequence[str | None] | None,
        delay_s: float | None,
        key: str | None,
        *,
        batch: bool,
    ) -> list[str]:
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
            await self._write(queue, bodies, ids, {}, delay_s, key)
            return ids
        attributes: dict[str, str | int] = {
            sc.SYSTEM: "redis",
            sc.OPERATION_NAME: "send",
            sc.OPERATION_TYPE: "send",
            sc.DESTINATION: stream,
            **self._server,
        }
        if batch:  # the conventions: a count on batch operations only
            attributes[sc.BATCH_MESSAGE_COUNT] = len(bodies)
        else:  # so a job's id finds its producer span too
            attributes[sc.CONVERSATION_ID] = ids[0]
        with _tracer.start_as_current_span(
            f"send {stream}", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ) as span:
            context: dict[str, str] = {}
            inject(context)
            entry_ids = await self._write(queue, bodies, ids, context, delay_s, key)
            if not batch and entry_ids:  # a delayed job has no entry yet
                span.set_attribute(sc.MESSAGE_ID, entry_ids[0])
        return ids

    async def _write(
        self,
        queue: str,
        bodies: list[bytes],
        ids: list[str],
        context: dict[str, str],
        delay_s: float | None,
        key: str | None,
    ) -> list[str]:
        """Write the entries (or delayed members); return the entry IDs XADD gave them."""
        pipe: Any = self._redis.pipeline(transaction=False)
        added: list[int] = []  # where each XADD's reply is
        count = self._partitions.get(queue, 1)
        if count > 1 and queue not in self._registered:  # once: workers then read them all
            pipe.sadd(self._keys.partitions(queue), *range(count))
        written: list[str] = []
        due_ms = int((time.time() + delay_s) * 1000) if delay_s else None
        now = utc_iso(time.time())
        for body, job_id in zip(bodies, ids, strict=True):
            fields: dict[str, str | bytes] = {"id": job_id, "payload": body, **context}
            if self._record_queued:  # before the entry exists, so it never hides a later status
                status = {
                    "status": Status.QUEUED.value,
                    "queue": base_queue(queue),
                    "attempt": 1,
                    "updated_at": now,
                }
                pipe.hset(self._keys.job(job_id), mapping=status)
                written.append(self._keys.job(job_id))
            part = self._keys.part(queue, self._chooser.pick(queue, count, key))
            if due_ms is None:
                added.append(len(pipe))
                pipe.xadd(self._keys.stream(part), fields)
                written.append(self._keys.stream(part))
            else:
                fields["attempt"] = "1"
                member = msgspec.json.encode({k: as_text(v) for k, v in fields.items()})
                pipe.zadd(self._keys.delayed(part), {member: due_ms})
                written.append(self._keys.delayed(part))
        replicas, timeout_ms = self._wait
        stream = self._keys.stream(queue)
        try:
            if replicas <= 0:
                replies = await pipe.execute()
            else:
                confirmed, replies = await wait_replicas(
                    self._redis, pipe, written, replicas, timeout_ms
                )
        except (redis.exceptions.RedisError, OSError) as exc:  # counted, then raised as it was
            self._observer.messages_sent(
                base_queue(queue), stream, len(bodies), type(exc).__qualname__
            )
            raise
        self._observer.messages_sent(base_queue(queue), stream, len(bodies), None)
        self._registered.add(queue)
        if replicas > 0 and confirmed < replicas:
            raise PublishError(
                f"{queue}: {len(ids)} jobs written but confirmed by {confirmed} of "
                f"{replicas} replicas within {timeout_ms} ms (JOBSTREAM_PUBLISH_WAIT_REPLICAS): "
                "they may run, or be lost if the master fails now; publish them again"
            )
        return [as_text(replies[i]) for i in added]


def _check_delay(delay_s: float | None) -> None:
    if delay_s is not None and not (math.isfinite(delay_s) and 0 <= delay_s <= 366 * 86400):
        raise PublishError(f"delay of {delay_s} s: use 0 to 31622400 seconds")


async def mark_queued(redis: AnyRedis, keys: Keys, job_id: str, queue: str) -> None:
    """Show a job `queued` in its hash, written after its entry: under the lowest fence,
    so it never hides what a worker has recorded meanwhile."""
    now = utc_iso(time.time())
    fields = ["status", "queued", "queue", queue, "attempt", "1", "updated_at", now]
    await redis.eval(_SETHASH_LUA, 1, keys.job(job_id), _FIRST_FENCE, 0, 0, len(fields), *fields)

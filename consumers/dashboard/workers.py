"""The workers page: what `jobstream workers` shows (`ops.workers`), and the entries each
consumer holds."""

from __future__ import annotations

from typing import Any

import msgspec
import redis.exceptions

from jobstream.consumers.cli import ops
from jobstream.consumers.dashboard import models as m
from jobstream.consumers.worker.deps import Deps

__all__ = ["HELD_SHOWN", "workers_page"]

HELD_SHOWN = 20  # entries shown per worker and queue


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def _held(deps: Deps, queue: str, consumer: str) -> list[m.Held]:
    """The first entries `consumer` holds in `queue`, with the job id each carries."""
    r, stream, group = deps.redis, deps.keys.stream(queue), deps.settings.group
    try:
        pending = await r.xpending_range(
            stream, group, min="-", max="+", count=HELD_SHOWN, consumername=consumer
        )
    except redis.exceptions.ResponseError:  # no stream or no group (yet)
        return []
    held = []
    for p in pending:
        entry_id = _text(p["message_id"])
        entries: Any = await r.xrange(stream, min=entry_id, max=entry_id, count=1)
        raw_id = entries[0][1].get(b"id") if entries else None
        held.append(
            m.Held(
                queue=queue,
                entry_id=entry_id,
                job_id=_text(raw_id) if raw_id else (entry_id if entries else None),
                idle_ms=int(p["time_since_delivered"]),
                deliveries=int(p["times_delivered"]),
            )
        )
    return held


async def workers_page(deps: Deps) -> m.WorkersPage:
    """Every consumer known to a queue's group or by its heartbeat, live ones first."""
    rows = await ops.workers(deps)
    workers = []
    for row in rows:
        held: list[m.Held] = []
        for queue in row["queues"]:  # of its group, and those its heartbeat names
            held += await _held(deps, queue, row["consumer"])
        workers.append(msgspec.convert({**row, "held": held}, m.Worker, from_attributes=True))
    workers.sort(key=lambda w: (not w.live, w.consumer))
    return m.WorkersPage(workers=workers)

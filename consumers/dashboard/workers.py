"""The workers page: what `jobstream workers` shows (`ops.workers`), and the entries each
consumer holds."""

from __future__ import annotations

from typing import Any

import msgspec
import redis.exceptions

from jobstream.consumers.cli import ops
from jobstream.consumers.dashboard import models as m
from jobstream.consumers.worker.deps import Deps
from jobstream.schema.text import as_text

__all__ = ["HELD_SHOWN", "workers_page"]

HELD_SHOWN = 20  # entries shown per worker and queue


async def _held(deps: Deps, queue: str, consumer: str) -> list[m.Held]:
    """The first entries `consumer` holds in `queue`, with the job id each carries."""
    r, stream, group = deps.redis, deps.keys.stream(queue), deps.settings.group
    try:
        pending = await r.xpending_range(
            stream, group, min="-", max="+", count=HELD_SHOWN, consumername=consumer
        )
    except redis.exceptions.ResponseError:  # no stream or no group (yet)
        return []
    ids = [as_text(p["message_id"]) for p in pending]
    pipe: Any = r.pipeline(transaction=False)  # one round trip for every held entry
    for entry_id in ids:
        pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
    found: list[Any] = await pipe.execute() if ids else []
    held = []
    for p, entry_id, entries in zip(pending, ids, found, strict=True):
        raw_id = entries[0][1].get(b"id") if entries else None
        held.append(
            m.Held(
                queue=queue,
                entry_id=entry_id,
                job_id=as_text(raw_id) if raw_id else (entry_id if entries else None),
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

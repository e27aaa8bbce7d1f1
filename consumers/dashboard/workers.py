"""The workers page: every consumer of the group, its heartbeat, and the entries it holds."""

from __future__ import annotations

import time
from typing import Any

import redis.exceptions

from jobstream.consumers.dashboard import models as m
from jobstream.consumers.dashboard.queries import all_queues
from jobstream.consumers.worker.deps import Deps

__all__ = ["HELD_SHOWN", "workers_page"]

HELD_SHOWN = 20  # entries shown per worker and queue


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def _held(deps: Deps, queue: str, consumer: str) -> list[m.Held]:
    r, stream, group = deps.redis, deps.keys.stream(queue), deps.settings.group
    pending = await r.xpending_range(
        stream, group, min="-", max="+", count=HELD_SHOWN, consumername=consumer
    )
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
    """Every consumer of the group on any queue: heartbeat age, entries held, which."""
    r, keys, group = deps.redis, deps.keys, deps.settings.group
    found: dict[str, dict[str, Any]] = {}
    for queue in await all_queues(deps):
        try:
            consumers = await r.xinfo_consumers(keys.stream(queue), group)
        except redis.exceptions.ResponseError:  # no stream or no group yet
            continue
        for c in consumers:
            name = _text(c["name"])
            w = found.setdefault(name, {"queues": [], "held": []})
            pending = int(c["pending"])
            w["queues"].append(m.WorkerQueue(queue=queue, pending=pending, idle_ms=int(c["idle"])))
            if pending:
                w["held"] += await _held(deps, queue, name)
    workers = []
    now = time.time()
    for name, w in found.items():
        beat = await r.get(keys.alive(name))
        age = round(max(now - float(beat), 0.0), 1) if beat is not None else None
        workers.append(
            m.Worker(
                name=name,
                alive=beat is not None,
                heartbeat_age_s=age,
                in_flight=sum(q.pending for q in w["queues"]),
                queues=w["queues"],
                held=w["held"],
            )
        )
    workers.sort(key=lambda w: (not w.alive, w.name))
    return m.WorkersPage(workers=workers)

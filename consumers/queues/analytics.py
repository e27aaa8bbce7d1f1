"""The `analytics` queue: record each platform event once and keep per-day counts.

A batch handler: one statement stores a whole batch of events and bumps their counters.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import batch_handler
from jobstream.schema.payloads import AnalyticsEvent
from jobstream.streams import Job, Policy

__all__ = ["RECORD_EVENTS_SQL", "record_events"]

# One statement, so one transaction: the events and their counters move together. Only
# the events this statement inserted are counted: one stored before (a redelivery, the
# producer sending twice, or another replica's batch committed first) bumps nothing, and
# a replica inserting the same event concurrently waits for the first to commit, then
# skips it. Events are inserted, and counters updated, in key order, so two batches
# sharing events lock them in the same order and cannot deadlock each other.
RECORD_EVENTS_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::text[], $8::text[])
        AS b(event_id, type, mailbox_id, campaign_id, message_id, occurred_at, properties,
             job_id)
), ins AS (
    INSERT INTO analytics_events (event_id, type, mailbox_id, campaign_id, message_id,
                                  occurred_at, properties, job_id)
    SELECT event_id, type, mailbox_id, campaign_id, message_id, occurred_at,
           properties::jsonb, job_id
    FROM batch ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, (occurred_at AT TIME ZONE 'UTC')::date AS day, type, mailbox_id,
              campaign_id
), by_mailbox AS (
    INSERT INTO analytics_daily_mailbox AS a (day, mailbox_id, type, count)
    SELECT day, mailbox_id, type, count(*) FROM ins
    GROUP BY day, mailbox_id, type ORDER BY day, mailbox_id, type
    ON CONFLICT (day, mailbox_id, type) DO UPDATE SET count = a.count + EXCLUDED.count
), by_campaign AS (
    INSERT INTO analytics_daily_campaign AS a (day, campaign_id, type, count)
    SELECT day, campaign_id, type, count(*) FROM ins WHERE campaign_id IS NOT NULL
    GROUP BY day, campaign_id, type ORDER BY day, campaign_id, type
    ON CONFLICT (day, campaign_id, type) DO UPDATE SET count = a.count + EXCLUDED.count
)
SELECT event_id FROM ins
"""

_encode = msgspec.json.Encoder().encode


@batch_handler(
    "analytics",
    AnalyticsEvent,
    Policy(max_attempts=10, timeout_s=30, concurrency=1000, batch_size=250, batch_wait_s=0.01),
)
async def record_events(
    jobs: Sequence[tuple[AnalyticsEvent, Job]], deps: Deps
) -> list[dict[str, bool]]:
    """Store a batch of events and bump their days' counters, in one statement.

    Idempotent by `event_id`: of the jobs carrying one event (in this batch, in another
    batch, redelivered, on another replica), exactly one returns `{"recorded": true}` and
    counts it; the others return `{"recorded": false}` and change no count.
    """
    first: dict[str, Job] = {}  # event id → the job that records it (ON CONFLICT sees
    for event, job in jobs:  # one row once per statement: duplicates are not sent)
        first.setdefault(event.event_id, job)
    sent = [(event, job) for event, job in jobs if first[event.event_id] is job]
    rows = await deps.pool.fetch(
        RECORD_EVENTS_SQL,
        [e.event_id for e, _ in sent],
        [e.type for e, _ in sent],
        [e.mailbox_id for e, _ in sent],
        [e.campaign_id for e, _ in sent],
        [e.message_id for e, _ in sent],
        [e.occurred_at for e, _ in sent],
        [_encode(e.properties).decode() for e, _ in sent],
        [j.id for _, j in sent],
    )
    stored = {row["event_id"] for row in rows}
    return [
        {"recorded": event.event_id in stored and first[event.event_id] is job}
        for event, job in jobs
    ]

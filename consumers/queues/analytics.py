"""The `analytics` queue: record each platform event once and keep per-day counts."""

from __future__ import annotations

import msgspec

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.schema.payloads import AnalyticsEvent
from jobstream.streams import Job, Policy

__all__ = ["record_event"]

# One statement, so one transaction: the event row and both counters move together, and
# an event already stored (a duplicate delivery) bumps nothing.
RECORD_EVENT_SQL = """
WITH ins AS (
    INSERT INTO analytics_events (event_id, type, mailbox_id, campaign_id, message_id,
                                  occurred_at, properties, job_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING (occurred_at AT TIME ZONE 'UTC')::date AS day, type, mailbox_id, campaign_id
), by_mailbox AS (
    INSERT INTO analytics_daily_mailbox AS a (day, mailbox_id, type, count)
    SELECT day, mailbox_id, type, 1 FROM ins
    ON CONFLICT (day, mailbox_id, type) DO UPDATE SET count = a.count + 1
), by_campaign AS (
    INSERT INTO analytics_daily_campaign AS a (day, campaign_id, type, count)
    SELECT day, campaign_id, type, 1 FROM ins WHERE campaign_id IS NOT NULL
    ON CONFLICT (day, campaign_id, type) DO UPDATE SET count = a.count + 1
)
SELECT count(*) AS recorded FROM ins
"""


@handler("analytics", AnalyticsEvent, Policy(max_attempts=10, timeout_s=30, concurrency=64))
async def record_event(event: AnalyticsEvent, job: Job, deps: Deps) -> dict[str, bool]:
    """Store the event and bump its day's counters, atomically.

    Idempotent by `event_id`: a duplicate (redelivery, or the producer sending twice)
    returns `{"recorded": false}` and changes no count.
    """
    recorded = await deps.pool.fetchval(
        RECORD_EVENT_SQL,
        event.event_id,
        event.type,
        event.mailbox_id,
        event.campaign_id,
        event.message_id,
        event.occurred_at,
        msgspec.json.encode(event.properties).decode(),
        job.id,
    )
    return {"recorded": bool(recorded)}

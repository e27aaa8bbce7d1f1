"""Platform events: `emit(event_type, data)` tells analytics and the customers' webhooks.

Handlers never do another queue's work inline: this publishes an `analytics` job and one
`webhook` job per active endpoint subscribed to the event type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, Literal

from jobstream.consumers.worker.deps import Deps
from jobstream.schema.payloads import AnalyticsEvent, WebhookDelivery

__all__ = ["ANALYTICS_TYPE", "EVENT_TYPES", "EventType", "emit"]

EventType = Literal[
    "email.sent",
    "email.delivered",
    "email.bounced",
    "email.replied",
    "email.opened",
    "email.clicked",
    "email.unsubscribed",
    "email.complained",
    "mailbox.warmup_paused",
]
EVENT_TYPES: frozenset[str] = frozenset(EventType.__args__)  # type: ignore[attr-defined]
ANALYTICS_TYPE: dict[str, str] = {
    "email.sent": "sent",
    "email.delivered": "delivered",
    "email.bounced": "bounce",
    "email.replied": "reply",
    "email.opened": "open",
    "email.clicked": "click",
    "email.unsubscribed": "unsubscribe",
    "email.complained": "complaint",
}

ENDPOINTS_SQL = """
SELECT id FROM webhook_endpoints WHERE active AND $1 = ANY(event_types) ORDER BY id
"""


async def emit(
    deps: Deps,
    event_type: EventType,
    data: dict[str, Any],
    *,
    key: str,
    mailbox_id: str | None = None,
    campaign_id: str | None = None,
    message_id: str | None = None,
    occurred_at: dt.datetime | None = None,
) -> list[str]:
    """Publish the event's analytics job and webhook jobs; return the job ids.

    `key` makes the event idempotent: the same key yields the same event id and the same
    job ids, so a handler that runs twice emits nothing new.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown platform event {event_type!r}")
    when = occurred_at or dt.datetime.now(dt.UTC)
    event_id = "evt_" + hashlib.sha256(f"{event_type}|{key}".encode()).hexdigest()[:32]
    ids: list[str] = []
    kind = ANALYTICS_TYPE.get(event_type)
    if kind is not None and mailbox_id is not None:
        event = AnalyticsEvent(
            event_id=event_id,
            type=kind,  # type: ignore[arg-type]
            mailbox_id=mailbox_id,
            campaign_id=campaign_id,
            message_id=message_id,
            occurred_at=when,
            properties={k: v for k, v in data.items() if isinstance(v, str | int | float | bool)},
        )
        ids.append(await deps.publisher.publish("analytics", event, f"analytics:{event_id}"))
    endpoints = [r["id"] for r in await deps.pool.fetch(ENDPOINTS_SQL, event_type)]
    if endpoints:
        body = {**data, "event_id": event_id}
        deliveries = [
            WebhookDelivery(
                endpoint_id=ep,
                message_id=f"msg_{event_id[4:]}_{ep}"[:200],
                event_type=event_type,
                timestamp=when,
                data=body,
            )
            for ep in endpoints
        ]
        job_ids = [f"webhook:{d.message_id}" for d in deliveries]
        ids += await deps.publisher.publish_many("webhook", deliveries, job_ids)
    return ids

"""The registry: queue → payload struct, handler and policy. Explicit assembly, no import magic."""

from __future__ import annotations

from typing import Any

from jobstream.consumers.queues import analytics, bounce, processing, sending, warmup, webhook
from jobstream.consumers.worker.handler import HandlerSpec

__all__ = ["HANDLERS", "by_queue"]

HANDLERS: tuple[HandlerSpec[Any], ...] = (
    analytics.record_events,
    processing.process_email,
    bounce.process_bounce,
    sending.send_email,
    warmup.run_warmup,
    webhook.deliver_webhook,
)


def by_queue() -> dict[str, HandlerSpec[Any]]:
    """The registered handlers keyed by queue name."""
    return {spec.queue: spec for spec in HANDLERS}

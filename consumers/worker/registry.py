"""The registry: queue → payload struct, handler and policy. Explicit assembly, no import magic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from jobstream.consumers.queues import analytics, bounce, processing, sending, warmup, webhook
from jobstream.consumers.worker.handler import HandlerSpec
from jobstream.streams import ConfigError

__all__ = ["HANDLERS", "by_queue", "payloads_of", "select"]

HANDLERS: tuple[HandlerSpec[Any], ...] = (
    analytics.record_events,
    processing.process_email,
    bounce.process_bounce,
    sending.send_email,
    warmup.run_warmup,
    webhook.deliver_webhook,
)


def by_queue(handlers: Sequence[HandlerSpec[Any]] = HANDLERS) -> dict[str, HandlerSpec[Any]]:
    """The handlers keyed by queue name; ConfigError when a queue is handled twice."""
    known: dict[str, HandlerSpec[Any]] = {}
    for spec in handlers:
        if spec.queue in known:
            raise ConfigError(f"queue {spec.queue} is handled twice: pass each queue once")
        known[spec.queue] = spec
    return known


def payloads_of(handlers: Sequence[HandlerSpec[Any]]) -> dict[str, type[msgspec.Struct]]:
    """Queue → payload struct of `handlers`: what a publisher for them accepts."""
    return {q: spec.payload for q, spec in by_queue(handlers).items()}


def select(
    handlers: Sequence[HandlerSpec[Any]], queues: Sequence[str] | None
) -> list[HandlerSpec[Any]]:
    """The handlers of `queues`, in that order (all of `handlers` when None or empty).

    ConfigError names every queue that no handler serves.
    """
    known = by_queue(handlers)
    if not queues:
        return list(known.values())
    unknown = [q for q in queues if q not in known]
    if unknown:
        raise ConfigError(
            f"no handler for queue {', '.join(unknown)} (handled: {', '.join(sorted(known))})"
        )
    return [known[q] for q in dict.fromkeys(queues)]

"""Small helpers shared by tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

from schema.payloads import AnalyticsEvent


def event(event_id: str, type_: str = "open", mailbox: str = "mb-1", **kw: Any) -> AnalyticsEvent:
    return AnalyticsEvent(
        event_id=event_id,
        type=type_,  # type: ignore[arg-type]
        mailbox_id=mailbox,
        occurred_at=kw.pop("occurred_at", dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)),
        **kw,
    )

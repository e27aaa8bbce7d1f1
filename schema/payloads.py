"""The payload struct of each queue: the single source of truth for what producers send.

Strict by design: required fields are required, lengths are bounded, unknown fields are
ignored so producers can be upgraded first. New fields always get a default.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "PAYLOADS",
    "RESERVED_HEADERS",
    "RESERVED_HEADER_PREFIXES",
    "AnalyticsEvent",
    "BounceRecipient",
    "ProcessBounce",
    "ProcessEmail",
    "RunWarmup",
    "SendEmail",
    "WebhookDelivery",
    "check_headers",
]

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
"""An identifier: a UUID, ULID or any opaque string of at most 200 characters."""
_ADDRESS_PATTERN = r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$"
Address = Annotated[str, msgspec.Meta(min_length=3, max_length=320, pattern=_ADDRESS_PATTERN)]
"""An email address (`local@domain`, at most 320 characters as RFC 5321 allows, no control
character). Handlers bring it to its normal form (`consumers/mail/addresses.py`) before use."""
Recipients = Annotated[list[Address], msgspec.Meta(max_length=100)]
Base64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64 * 1024 * 1024)]
"""Base64 text; the handler enforces the configured decoded-size limit."""
Props = Annotated[dict[str, Any], msgspec.Meta(max_length=100)]

RESERVED_HEADERS = frozenset(
    {
        *("from", "sender", "to", "cc", "bcc", "subject", "date", "message-id"),
        *("mime-version", "return-path"),
    }
)
"""Headers the platform sets itself (or the relay does); `SendEmail.headers` may not hold them."""
RESERVED_HEADER_PREFIXES = ("content-", "resent-", "list-unsubscribe")
"""Name prefixes reserved likewise: the MIME structure, resending, one-click unsubscribe."""
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but the colon
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HTAB, which values may hold

EventType = Literal[
    "sent", "delivered", "open", "click", "reply", "bounce", "unsubscribe", "complaint"
]


class AnalyticsEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Payload of `analytics`: one platform event, recorded once by `event_id`."""

    event_id: Id
    """Idempotency key: the same event delivered twice is counted once."""
    type: EventType
    """What happened."""
    mailbox_id: Id
    """The platform mailbox the event belongs to."""
    occurred_at: dt.datetime
    """When it happened (RFC 3339 with an offset; counted on its UTC day)."""
    campaign_id: Id | None = None
    """The campaign, when the message belongs to one."""
    message_id: Annotated[str, msgspec.Meta(max_length=998)] | None = None
    """The RFC 5322 Message-ID of the message concerned."""
    properties: Props = msgspec.field(default_factory=dict)
    """Free-form details (link clicked, user agent, bounce kind ...), at most 100 keys."""

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must carry a UTC offset")


class ProcessEmail(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `email:processing`: one raw message received by a platform mailbox."""

    mailbox_id: Id
    """The receiving mailbox."""
    raw_b64: Base64
    """The RFC 5322 message, base64-encoded, exactly as received."""
    received_at: dt.datetime | None = None
    """When the platform's MX accepted it; default: when the job runs."""


class BounceRecipient(msgspec.Struct, frozen=True, kw_only=True):
    """One recipient already extracted from a bounce by the producer."""

    address: Address
    """The recipient the message could not be delivered to."""
    status: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    """Enhanced status code (`5.1.1`) or SMTP reply code (`550`)."""
    action: Literal["failed", "delayed", "delivered", "relayed", "expanded"] | None = None
    """The RFC 3464 `Action` of this recipient, when known."""
    diagnostic: Annotated[str, msgspec.Meta(max_length=4000)] | None = None
    """The remote server's reply text."""


class ProcessBounce(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `bounce`: a raw bounce message, or recipients already extracted from one."""

    raw_b64: Base64 | None = None
    """The bounce message, base64-encoded (a DSN or any mailer-daemon notice)."""
    recipients: Annotated[list[BounceRecipient], msgspec.Meta(max_length=1000)] | None = None
    """Recipients already extracted; used when `raw_b64` is absent."""
    mailbox_id: Id | None = None
    """The platform mailbox that received the bounce, when known."""
    message_id: Annotated[str, msgspec.Meta(max_length=998)] | None = None
    """Message-ID of the bounced outbound message, when the producer knows it."""

    def __post_init__(self) -> None:
        if self.raw_b64 is None and not self.recipients:
            raise ValueError("a bounce needs raw_b64 or a non-empty recipients list")


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse, with a ValueError naming it, a header that is not what it claims to be.

    A name must be an RFC 5322 field name (printable ASCII, no colon, no whitespace), not
    reserved (case-insensitive: `RESERVED_HEADERS`, `RESERVED_HEADER_PREFIXES`) and given
    once; a value holds no control character but HTAB (no CR, LF or NUL).
    """
    seen: set[str] = set()
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(
                f"header name {name!r} is not a field name: printable ASCII, no colon or space"
            )
        key = name.lower()
        if key in RESERVED_HEADERS or key.startswith(RESERVED_HEADER_PREFIXES):
            raise ValueError(f"header {name} is set by the platform")
        if key in seen:
            raise ValueError(f"header {name} is given twice (names ignore case)")
        seen.add(key)
        if _CONTROL.search(value):
            raise ValueError(f"header {name} holds a control character (CR, LF, NUL ...)")


class SendEmail(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `email-sending`: one message to send from one platform mailbox."""

    mailbox_id: Id
    """The sending mailbox (its address is the From)."""
    to: Annotated[Recipients, msgspec.Meta(min_length=1)]
    """Primary recipients, at least one."""
    subject: Annotated[str, msgspec.Meta(max_length=998)]
    """The Subject header (non-ASCII is encoded as RFC 2047)."""
    cc: Recipients = msgspec.field(default_factory=list)
    """Carbon-copy recipients."""
    bcc: Recipients = msgspec.field(default_factory=list)
    """Blind-copy recipients: in the envelope, never in the headers."""
    text: Annotated[str, msgspec.Meta(max_length=10 * 1024 * 1024)] | None = None
    """Plain-text body."""
    html: Annotated[str, msgspec.Meta(max_length=10 * 1024 * 1024)] | None = None
    """HTML body; with `text`, the message is multipart/alternative."""
    headers: Annotated[dict[str, str], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=dict
    )
    """Extra headers (`X-...`, `Reply-To`, `In-Reply-To`, `References`, the warmup header ...);
    see `check_headers`. An ASCII value is sent as given, a non-ASCII one RFC 2047-encoded."""
    campaign_id: Id | None = None
    """Campaign mail gets one-click `List-Unsubscribe` headers."""
    message_id: Annotated[str, msgspec.Meta(max_length=998)] | None = None
    """Message-ID to use; default: one is made from the job id, stable across retries."""

    def __post_init__(self) -> None:
        if self.text is None and self.html is None:
            raise ValueError("a message needs text, html or both")
        check_headers(self.headers)
        for field, value in (("subject", self.subject), ("message_id", self.message_id)):
            if value is not None and _CONTROL.search(value):
                raise ValueError(f"{field} holds a control character (CR, LF, NUL ...)")


class RunWarmup(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `warmup`: plan and send one mailbox's warmup emails for one day."""

    mailbox_id: Id
    """The mailbox being warmed up."""
    day: dt.date | None = None
    """The UTC day to plan; default: today."""


class WebhookDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `webhook`: one platform event to deliver to one customer endpoint."""

    endpoint_id: Id
    """The registered endpoint (`webhook_endpoints.id`)."""
    message_id: Id
    """The Standard Webhooks `webhook-id`: stable across retries of this delivery."""
    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    """The platform event type, e.g. `email.sent`."""
    timestamp: dt.datetime
    """When the event happened."""
    data: Annotated[dict[str, Any], msgspec.Meta(max_length=200)]
    """The event's data, sent as the body's `data` object."""


PAYLOADS: dict[str, type[msgspec.Struct]] = {
    "email:processing": ProcessEmail,
    "email-sending": SendEmail,
    "warmup": RunWarmup,
    "bounce": ProcessBounce,
    "analytics": AnalyticsEvent,
    "webhook": WebhookDelivery,
}
"""Queue name → payload struct, for the six queues of the platform."""

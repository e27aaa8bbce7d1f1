"""Amazon SES notifications: the JSON that SES mails, directly or inside an SNS envelope.

Pure functions over already-decoded text; classification lives in `dsn`.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from jobstream.consumers.mail import dsn_text

__all__ = ["SesNotice", "SesRecipient", "read_notice"]

# Sendmail and others split lines longer than their limit with "!" + newline + space;
# nothing like it can stand inside or between JSON tokens, so it is always an artefact.
_WRAPS = ("!\r\n ", "!\n ")
_MARKERS = ('"notificationType"', '"eventType"', '\\"notificationType\\"', '\\"eventType\\"')


class _Recipient(msgspec.Struct, frozen=True, rename="camel"):
    email_address: str = ""
    status: str | None = None
    action: str | None = None
    diagnostic_code: str | None = None


class _Bounce(msgspec.Struct, frozen=True, rename="camel"):
    bounce_type: str = ""
    bounced_recipients: list[_Recipient] = []
    reporting_mta: str | None = msgspec.field(default=None, name="reportingMTA")


class _Header(msgspec.Struct, frozen=True):
    name: str = ""
    value: str = ""


class _CommonHeaders(msgspec.Struct, frozen=True, rename="camel"):
    message_id: str | None = None


class _Mail(msgspec.Struct, frozen=True, rename="camel"):
    common_headers: _CommonHeaders | None = None
    headers: list[_Header] = []


class _Notification(msgspec.Struct, frozen=True, rename="camel"):
    notification_type: str | None = None
    event_type: str | None = None  # the event-publishing form names the type here
    bounce: _Bounce | None = None
    mail: _Mail | None = None


@dataclass(frozen=True, slots=True)
class SesRecipient:
    """One bounced recipient as SES reports it."""

    address: str  # lower-cased
    status: str | None
    action: str | None
    diagnostic: str | None


@dataclass(frozen=True, slots=True)
class SesNotice:
    """What an SES notification says; `bounce_type` is Permanent, Transient or Undetermined."""

    is_bounce: bool
    bounce_type: str
    recipients: list[SesRecipient]
    reporting_mta: str | None
    message_id: str | None  # the original's Message-ID, with angle brackets


def read_notice(text: str) -> SesNotice | None:
    """Read the SES notification in `text`, or return None if there is none.

    A notification of another type (Complaint, Delivery, ...) is returned with
    `is_bounce=False`; a bounce whose JSON does not have SES's shape is not one.
    """
    if not any(marker in text for marker in _MARKERS):
        return None
    for wrap in _WRAPS:
        text = text.replace(wrap, "")
    notification = _notification(_first_object(text))
    if notification is None:
        return None
    kind = notification.notification_type or notification.event_type or ""
    if kind.lower() != "bounce" or notification.bounce is None:
        return SesNotice(False, "", [], None, None)
    bounce = notification.bounce
    return SesNotice(
        is_bounce=True,
        bounce_type=bounce.bounce_type,
        recipients=[r for r in map(_recipient, bounce.bounced_recipients) if r is not None],
        reporting_mta=bounce.reporting_mta,
        message_id=_message_id(notification.mail),
    )


def _first_object(text: str) -> Any:
    """Decode the first JSON object in `text`, ignoring what follows it (SNS's footer)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
        return None
    return value


def _notification(value: Any) -> _Notification | None:
    """Unwrap an SNS envelope (`{"Type": "Notification", "Message": "<json>"}`) if any."""
    if isinstance(value, dict) and isinstance(value.get("Message"), str):
        value = _first_object(value["Message"])
    if not isinstance(value, dict):
        return None
    try:
        notification = msgspec.convert(value, _Notification)
    except msgspec.ValidationError:  # an SES field of the wrong type: not SES's shape
        return None
    return notification if notification.notification_type or notification.event_type else None


def _recipient(raw: _Recipient) -> SesRecipient | None:
    _, address = email.utils.parseaddr(raw.email_address)
    address = address.strip().lower()
    if not dsn_text.ADDRESS_RE.fullmatch(address):
        return None
    return SesRecipient(address, raw.status, raw.action, raw.diagnostic_code)


def _message_id(mail: _Mail | None) -> str | None:
    if mail is None:
        return None
    values = [h.value for h in mail.headers if h.name.lower() == "message-id"]
    if mail.common_headers is not None and mail.common_headers.message_id:
        values.insert(0, mail.common_headers.message_id)
    for value in values:
        value = value.strip().strip("<>").strip()
        if value:
            return f"<{value}>"
    return None

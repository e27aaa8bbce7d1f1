"""Build the RFC 5322 message of an `email-sending` job. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
import hashlib
import urllib.parse
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from schema.payloads import SendEmail

__all__ = ["RESERVED_HEADERS", "build_message", "message_id_for"]

RESERVED_HEADERS = frozenset(
    {
        *("from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version"),
        *("content-type", "content-transfer-encoding", "sender", "return-path"),
    }
)
"""Headers the platform sets itself; a payload's `headers` may not override them."""


def message_id_for(msg: SendEmail, job_id: str, address: str) -> str:
    """The Message-ID (no angle brackets): the payload's, else one derived from the job id,
    so every attempt of a job sends the same Message-ID."""
    if msg.message_id:
        return msg.message_id.strip().removeprefix("<").removesuffix(">")
    domain = address.rpartition("@")[2] or "localhost"
    return f"{hashlib.sha256(job_id.encode()).hexdigest()[:32]}@{domain}"


def _unsubscribe(url: str, message_id: str, campaign_id: str, address: str) -> str:
    query = urllib.parse.urlencode({"m": message_id, "c": campaign_id})
    sep = "&" if "?" in url else "?"
    mailto = f"mailto:{address}?subject=unsubscribe"
    return f"<{url}{sep}{query}>, <{mailto}>"


def build_message(
    msg: SendEmail,
    *,
    address: str,
    display_name: str | None,
    message_id: str,
    unsubscribe_url: str,
    now: dt.datetime | None = None,
) -> EmailMessage:
    """The message to send. Raises ValueError on a header the platform owns or one that
    would inject lines (CR/LF in a value)."""
    em = EmailMessage()
    em["From"] = Address(display_name=display_name or "", addr_spec=address)
    em["To"] = ", ".join(msg.to)
    if msg.cc:
        em["Cc"] = ", ".join(msg.cc)
    em["Subject"] = msg.subject
    em["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    em["Message-ID"] = f"<{message_id}>"
    for name, value in msg.headers.items():
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name} is set by the platform")
        if any(c in name for c in ":\r\n ") or not name.isascii():
            raise ValueError(f"invalid header name {name!r}")
        em[name] = value
    if msg.campaign_id and "list-unsubscribe" not in {k.lower() for k in msg.headers}:
        em["List-Unsubscribe"] = _unsubscribe(unsubscribe_url, message_id, msg.campaign_id, address)
        em["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    if msg.text is not None and msg.html is not None:
        em.set_content(msg.text)
        em.add_alternative(msg.html, subtype="html")
    elif msg.html is not None:
        em.set_content(msg.html, subtype="html")
    else:
        em.set_content(msg.text or "")
    return em

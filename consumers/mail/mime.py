"""Build the RFC 5322 message of an `email-sending` job. Pure, no I/O."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import urllib.parse
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime

from jobstream.schema.payloads import RESERVED_HEADERS, SendEmail, check_headers

__all__ = ["RESERVED_HEADERS", "build_message", "message_id_for"]

_FOLD_AT = 78  # RFC 5322: lines SHOULD be at most 78 characters ...
_MAX_LINE = 998  # ... and MUST be at most 998
_WSP_RUN = re.compile(r"(?<![ \t])(?=[ \t])")  # the start of each run of spaces and tabs


class _Verbatim(str):
    """An ASCII header value written as given: folded only before its own whitespace, never
    RFC 2047-encoded.

    The email package encodes any word too long for one line (a URL, a Message-ID in
    References), which breaks one-click unsubscribe and threading. A value with a `name`
    attribute is a header object to it: stored as is, and written by its `fold`.
    """

    name: str
    lines: list[str]

    def __new__(cls, name: str, value: str) -> _Verbatim:
        if not value.isascii():
            raise ValueError(f"header {name} must be ASCII to be sent as given")
        self = super().__new__(cls, value)
        self.name = name
        pieces = _WSP_RUN.split(f"{name}: {value}")
        self.lines = [pieces[0]]
        for piece in pieces[1:]:
            fits = len(self.lines[-1]) + len(piece) <= _FOLD_AT
            if fits or not piece.strip() or self.lines[-1] == pieces[0]:
                self.lines[-1] += piece
            else:
                self.lines.append(piece)
        if any(len(line) > _MAX_LINE for line in self.lines):
            raise ValueError(f"header {name} has a word too long for a line ({_MAX_LINE})")
        return self

    def fold(self, *, policy: Policy) -> str:
        return policy.linesep.join(self.lines) + policy.linesep


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
    mailto = f"mailto:{urllib.parse.quote(address, safe='@+')}?subject=unsubscribe"
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
    """The message to send. Raises ValueError on a header `check_headers` refuses, and on
    one that cannot be written as given (a word longer than a line)."""
    em = EmailMessage()
    em["From"] = Address(display_name=display_name or "", addr_spec=address)
    em["To"] = ", ".join(msg.to)
    if msg.cc:
        em["Cc"] = ", ".join(msg.cc)
    em["Subject"] = msg.subject
    em["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    em["Message-ID"] = f"<{message_id}>"
    check_headers(msg.headers)  # the payload did too, unless it was built around its checks
    for name, value in msg.headers.items():
        em[name] = _Verbatim(name, value) if value.isascii() else value
    if msg.campaign_id:
        uris = _unsubscribe(unsubscribe_url, message_id, msg.campaign_id, address)
        em["List-Unsubscribe"] = _Verbatim("List-Unsubscribe", uris)
        em["List-Unsubscribe-Post"] = _Verbatim(
            "List-Unsubscribe-Post", "List-Unsubscribe=One-Click"
        )
    if msg.text is not None and msg.html is not None:
        em.set_content(msg.text)
        em.add_alternative(msg.html, subtype="html")
    elif msg.html is not None:
        em.set_content(msg.html, subtype="html")
    else:
        em.set_content(msg.text or "")
    return em

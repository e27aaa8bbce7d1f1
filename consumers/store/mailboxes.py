"""Platform mailboxes: the `mailboxes` rows, and the SMTP relay each one sends through.

A relay URL may carry credentials; only `redact_url` of it is ever shown, and the password
of every relay parsed is remembered so that `scrub` hides it wherever it turns up.
"""

from __future__ import annotations

import datetime as dt
import secrets
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from jobstream.otel.redact import redact_url, remember_secrets, secrets_of_url
from jobstream.streams import ConfigError

__all__ = [
    "Mailbox",
    "Relay",
    "add_mailbox",
    "get_mailbox",
    "list_mailboxes",
    "parse_relay",
    "set_status",
    "set_warmup",
]

MAILBOX_COLUMNS = (
    "id, address, display_name, smtp_url, daily_limit, per_minute_limit, warmup_enabled, "
    "warmup_started_on, status"
)
GET_MAILBOX_SQL = f"SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE id = $1"
LIST_MAILBOXES_SQL = f"SELECT {MAILBOX_COLUMNS} FROM mailboxes ORDER BY created_at, id"
ADD_MAILBOX_SQL = f"""
INSERT INTO mailboxes (id, address, display_name, smtp_url, daily_limit, per_minute_limit,
                       warmup_enabled, warmup_started_on)
VALUES ($1, lower($2), $3, $4, $5, $6, $7, CASE WHEN $7 THEN $8::date END)
RETURNING {MAILBOX_COLUMNS}
"""
SET_STATUS_SQL = "UPDATE mailboxes SET status = $2, updated_at = now() WHERE id = $1"
SET_WARMUP_SQL = """
UPDATE mailboxes SET warmup_enabled = $2, updated_at = now(),
       warmup_started_on = CASE WHEN $2 THEN coalesce(warmup_started_on, $3::date)
                                ELSE warmup_started_on END
WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class Relay:
    """Where and how to hand a message over: host, port, TLS mode and optional AUTH."""

    host: str
    port: int
    use_tls: bool = False
    start_tls: bool = False
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    shown: str = ""
    """The URL with its password replaced by `***`: safe for logs, errors and results."""


def parse_relay(url: str) -> Relay:
    """`smtp://[user:pass@]host[:port][?starttls]` (plain or STARTTLS, default port 25 or 587)
    or `smtps://[user:pass@]host[:port]` (implicit TLS, default port 465)."""
    shown = redact_url(url) or ""
    remember_secrets(secrets_of_url(url))
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError(f"invalid relay URL {shown!r}: use smtp://host:port or smtps://...")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    starttls = query.get("starttls", ["false"])[-1].lower() in ("", "1", "true", "yes")
    use_tls = parts.scheme == "smtps"
    try:
        port = parts.port or (465 if use_tls else 587 if starttls else 25)
    except ValueError:
        raise ConfigError(f"invalid relay URL {shown!r}: bad port") from None
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return Relay(parts.hostname, port, use_tls, starttls and not use_tls, user, password, shown)


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One row of `mailboxes`; `smtp_url` None means the default relay (`SMTP_URL`)."""

    id: str
    address: str
    display_name: str | None
    smtp_url: str | None = field(repr=False)
    daily_limit: int
    per_minute_limit: int
    warmup_enabled: bool
    warmup_started_on: dt.date | None
    status: str

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Mailbox:
        return cls(**dict(row.items()))

    def relay(self, default_url: str | None) -> Relay:
        """This mailbox's relay, or the default one; ConfigError when neither is set."""
        url = self.smtp_url or default_url
        if not url:
            raise ConfigError(f"mailbox {self.id} has no relay and SMTP_URL is not set")
        return parse_relay(url)

    def public(self) -> dict[str, Any]:
        """The row for display: the relay shown without its password."""
        return {
            "id": self.id,
            "address": self.address,
            "display_name": self.display_name,
            "relay": redact_url(self.smtp_url) if self.smtp_url else "default (SMTP_URL)",
            "daily_limit": self.daily_limit,
            "per_minute_limit": self.per_minute_limit,
            "warmup": self.warmup_enabled,
            "warmup_started_on": self.warmup_started_on,
            "status": self.status,
        }


async def get_mailbox(pool: asyncpg.Pool, mailbox_id: str) -> Mailbox | None:
    row = await pool.fetchrow(GET_MAILBOX_SQL, mailbox_id)
    return None if row is None else Mailbox.from_row(row)


async def list_mailboxes(pool: asyncpg.Pool) -> list[Mailbox]:
    return [Mailbox.from_row(r) for r in await pool.fetch(LIST_MAILBOXES_SQL)]


async def add_mailbox(
    pool: asyncpg.Pool,
    address: str,
    *,
    mailbox_id: str | None = None,
    display_name: str | None = None,
    smtp_url: str | None = None,
    daily_limit: int = 500,
    per_minute_limit: int = 20,
    warmup: bool = False,
    today: dt.date | None = None,
) -> Mailbox:
    """Insert a mailbox; ConfigError on a bad relay URL, limit or a taken id/address."""
    if smtp_url is not None:
        parse_relay(smtp_url)  # refuse a malformed relay now, not at the first send
    if "@" not in address or daily_limit < 0 or per_minute_limit < 0:
        raise ConfigError("a mailbox needs an address local@domain and limits >= 0")
    new_id = mailbox_id or f"mb_{secrets.token_hex(6)}"
    day = today or dt.datetime.now(dt.UTC).date()
    try:
        row = await pool.fetchrow(
            ADD_MAILBOX_SQL,
            new_id,
            address,
            display_name,
            smtp_url,
            daily_limit,
            per_minute_limit,
            warmup,
            day,
        )
    except asyncpg.UniqueViolationError:
        raise ConfigError(f"a mailbox with id {new_id} or address {address} exists") from None
    assert row is not None  # INSERT ... RETURNING yields its row
    return Mailbox.from_row(row)


async def set_status(pool: asyncpg.Pool, mailbox_id: str, status: str) -> bool:
    """Pause or resume sending; False when there is no such mailbox."""
    if status not in ("active", "paused"):
        raise ConfigError(f"invalid mailbox status {status!r}")
    return str(await pool.execute(SET_STATUS_SQL, mailbox_id, status)) == "UPDATE 1"


async def set_warmup(
    pool: asyncpg.Pool, mailbox_id: str, enabled: bool, today: dt.date | None = None
) -> bool:
    """Enable (first time: the ramp starts today) or disable warmup; False when not found."""
    day = today or dt.datetime.now(dt.UTC).date()
    return str(await pool.execute(SET_WARMUP_SQL, mailbox_id, enabled, day)) == "UPDATE 1"

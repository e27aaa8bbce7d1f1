"""The `email:processing` queue: parse, classify and store one inbound message, then fan out."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from jobstream.consumers.mail.inbound import WARMUP_HEADER, Classification, ParsedMessage, classify
from jobstream.consumers.mail.rawmail import decode_raw, sha256_hex
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.events import emit
from jobstream.consumers.worker.handler import handler
from jobstream.schema.payloads import ProcessBounce, ProcessEmail
from jobstream.schema.text import clean_text
from jobstream.streams import Job, Policy

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

__all__ = ["bounce_job_id", "inbound_key", "process_email"]

_MAX_KEY_BYTES = 512  # a longer Message-ID is not used as the key: the digest is
_MAX_THREAD_IDS = 100  # In-Reply-To plus the most recent References looked up as ours
_MAX_ID_CHARS = 998
_MAX_MAILBOX_CHARS = 200

INSERT_INBOUND_SQL = """
INSERT INTO inbound_messages (
    mailbox_id, message_id, has_message_id, raw_sha256, size_bytes, in_reply_to,
    reference_ids, from_addr, from_email, to_addrs, cc_addrs, subject, date, text_body,
    html_body, attachments, headers, defects, classification, received_at, job_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb,
        $17::jsonb, $18, $19, $20, $21)
ON CONFLICT (mailbox_id, message_id) DO NOTHING
RETURNING id
"""

OUR_MESSAGES_SQL = """
SELECT message_id, mailbox_id, campaign_id, is_warmup,
       (coalesce(sent_at, created_at) AT TIME ZONE 'UTC')::date AS day
FROM outbound_messages
WHERE message_id = ANY($1::text[])
"""

COUNT_WARMUP_SQL = """
INSERT INTO warmup_daily AS w (mailbox_id, day, received, replied)
VALUES ($1, $2, $3, $4)
ON CONFLICT (mailbox_id, day) DO UPDATE
SET received = w.received + EXCLUDED.received, replied = w.replied + EXCLUDED.replied
"""


@dataclass(frozen=True, slots=True)
class _Inbound:
    """One message as this handler sees it, once parsed and classified."""

    payload: ProcessEmail
    parsed: ParsedMessage
    key: str
    classification: Classification
    received_at: dt.datetime
    ours: dict[str, asyncpg.Record]  # our outbound messages it names, by Message-ID


@handler("email:processing", ProcessEmail, Policy(max_attempts=5, timeout_s=120, concurrency=8))
async def process_email(msg: ProcessEmail, job: Job, deps: Deps) -> dict[str, Any]:
    """Parse, classify and store one inbound message; publish its follow-up jobs.

    Idempotent: the row is keyed by (mailbox, Message-ID) — or the SHA-256 of the raw
    bytes when there is no usable Message-ID — and inserted with ON CONFLICT DO NOTHING,
    so the same message processed twice is stored once. Warmup counters move in the same
    transaction, only when the row is new. Follow-ups (a `bounce` job, the `email.replied`
    event) use ids derived from that key, and are published when the row is new or when
    this job is a retry or redelivery (an earlier run may have stored the row and died
    before publishing); a republished follow-up carries the same job or event id.
    """
    raw = decode_raw(msg.raw_b64, deps.settings.max_inbound_bytes)
    parsed = await deps.parser.parse_message(raw)  # off the event loop; stopped at the timeout
    key, has_id = inbound_key(parsed.message_id, raw)
    ours = await _our_messages(deps.pool, parsed)
    thread = {i for i in _thread_ids(parsed) if i in ours}
    received_at = _utc(msg.received_at)
    inbound = _Inbound(msg, parsed, key, classify(parsed, thread), received_at, ours)
    warmup: dict[str, str | None] | None = None
    async with deps.pool.acquire() as conn, conn.transaction():
        row_id = await conn.fetchval(INSERT_INBOUND_SQL, *_row(inbound, raw, has_id, job.id))
        if row_id is not None and inbound.classification == "warmup":
            warmup = await _count_warmup(conn, inbound)
    stored = row_id is not None
    published: list[str] = []
    if stored or job.attempt > 1 or job.delivery_count > 1:
        published = await _follow_up(deps, inbound)
    return {
        "classification": inbound.classification,
        "stored": stored,
        "message_id": key,
        "has_message_id": has_id,
        "defects": len(parsed.defects),
        "attachments": len(parsed.attachments),
        "published": published,
        "warmup": warmup,
    }


def inbound_key(message_id: str | None, raw: bytes) -> tuple[str, bool]:
    """The storage key and whether it is the Message-ID (else `sha256:<digest of raw>`)."""
    key = clean_text(message_id)
    if key and len(key.encode()) <= _MAX_KEY_BYTES:
        return key, True
    return f"sha256:{sha256_hex(raw)}", False


def bounce_job_id(mailbox_id: str, key: str) -> str:
    """The id of the `bounce` job published for one stored message: the same on every run."""
    return "bounce:" + hashlib.sha256(f"{mailbox_id}|{key}".encode()).hexdigest()[:40]


def _utc(when: dt.datetime | None) -> dt.datetime:
    if when is None:
        return dt.datetime.now(dt.UTC)
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when


def _thread_ids(parsed: ParsedMessage) -> list[str]:
    ids = [clean_text(i) for i in (parsed.in_reply_to, *parsed.references[-_MAX_THREAD_IDS:])]
    return list(dict.fromkeys(i for i in ids if i and len(i) <= _MAX_ID_CHARS))


async def _our_messages(pool: asyncpg.Pool, parsed: ParsedMessage) -> dict[str, asyncpg.Record]:
    """Our outbound messages among the thread ids and the message's own id (warmup sends)."""
    ids = _thread_ids(parsed)
    own = clean_text(parsed.message_id)
    if own and len(own) <= _MAX_ID_CHARS:
        ids.append(own)
    if not ids:
        return {}
    return {r["message_id"]: r for r in await pool.fetch(OUR_MESSAGES_SQL, ids)}


def _row(inbound: _Inbound, raw: bytes, has_id: bool, job_id: str) -> tuple[Any, ...]:
    p = inbound.parsed
    attachments = [
        {
            "filename": clean_text(a.filename),
            "content_type": clean_text(a.content_type),
            "size": a.size,
        }
        for a in p.attachments
    ]
    headers = {k: clean_text(v) for k, v in p.headers.items()}
    return (
        inbound.payload.mailbox_id,
        inbound.key,
        has_id,
        sha256_hex(raw),
        len(raw),
        clean_text(p.in_reply_to),
        _texts(p.references),
        clean_text(p.from_addr),
        clean_text(p.from_email),
        _texts(p.to),
        _texts(p.cc),
        clean_text(p.subject),
        p.date,
        clean_text(p.text_body),
        clean_text(p.html_body),
        msgspec.json.encode(attachments).decode(),
        msgspec.json.encode(headers).decode(),
        _texts(p.defects),
        inbound.classification,
        inbound.received_at,
        job_id,
    )


def _texts(values: list[str]) -> list[str]:
    return [clean_text(v) or "" for v in values]


def _warmup_sender(inbound: _Inbound) -> tuple[str, dt.date] | None:
    """The mailbox and warmup day an inbound warmup message counts for.

    Named by the header: `<mailbox>:<YYYY-MM-DD>` as the warmup queue writes it, or
    `key=value` pairs with `mailbox` (and `day`); failing that, the mailbox and UTC send
    day of our outbound message with this Message-ID.
    """
    value = clean_text(inbound.parsed.headers.get(WARMUP_HEADER.lower(), "").strip()) or ""
    pairs = (part.partition("=") for part in value.split(";"))
    fields = {k.strip().lower(): v.strip() for k, sep, v in pairs if sep}
    mailbox, _, day = value.rpartition(":")
    if fields.get("mailbox"):
        mailbox, day = fields["mailbox"], fields.get("day", "")
    elif "=" in value:
        mailbox = ""
    if 0 < len(mailbox) <= _MAX_MAILBOX_CHARS:
        return mailbox, _day(day, inbound.received_at)
    row = inbound.ours.get(clean_text(inbound.parsed.message_id) or "")
    return (row["mailbox_id"], row["day"]) if row is not None else None


async def _count_warmup(conn: Conn, inbound: _Inbound) -> dict[str, str | None]:
    """Count a received warmup message for its sender's mailbox and day, and a reply for
    the mailbox whose warmup message it answers (on the UTC day that one was sent)."""
    counts: list[tuple[str, dt.date, int, int]] = []
    sender = _warmup_sender(inbound)
    if sender is not None:
        counts.append((*sender, 1, 0))
    ours = [inbound.ours[i] for i in _thread_ids(inbound.parsed) if i in inbound.ours]
    answered = next((r for r in ours if r["is_warmup"]), None)
    if answered is not None:
        counts.append((answered["mailbox_id"], answered["day"], 0, 1))
    if counts:
        await conn.executemany(COUNT_WARMUP_SQL, counts)
    return {
        "received_by": sender[0] if sender else None,
        "day": sender[1].isoformat() if sender else None,
        "replied_to": answered["mailbox_id"] if answered is not None else None,
    }


def _day(text: str, default: dt.datetime) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        return default.date()


async def _follow_up(deps: Deps, inbound: _Inbound) -> list[str]:
    """Publish what other queues do with this message; return the job ids."""
    mailbox_id = inbound.payload.mailbox_id
    if inbound.classification == "bounce":
        bounce = ProcessBounce(raw_b64=inbound.payload.raw_b64, mailbox_id=mailbox_id)
        job_id = bounce_job_id(mailbox_id, inbound.key)
        return [await deps.publisher.publish("bounce", bounce, job_id)]
    if inbound.classification == "reply":
        return await _emit_reply(deps, inbound)
    return []


async def _emit_reply(deps: Deps, inbound: _Inbound) -> list[str]:
    """`email.replied` (and so the analytics `reply` event) for the message it answers."""
    parsed = inbound.parsed
    # In-Reply-To first, then the most recent of ours in References
    candidates = [clean_text(i) for i in (parsed.in_reply_to, *reversed(parsed.references))]
    target_id = next((i for i in candidates if i and i in inbound.ours), None)
    if target_id is None:
        return []
    target = inbound.ours[target_id]
    data: dict[str, Any] = {
        "mailbox_id": inbound.payload.mailbox_id,
        "message_id": target_id,
        "reply_message_id": inbound.key,
        "from": clean_text(parsed.from_email),
        "subject": clean_text(parsed.subject),
        "received_at": inbound.received_at.isoformat(),
    }
    return await emit(
        deps,
        "email.replied",
        data,
        key=f"reply|{inbound.payload.mailbox_id}|{inbound.key}",
        mailbox_id=target["mailbox_id"],
        campaign_id=target["campaign_id"],
        message_id=target_id,
        occurred_at=inbound.received_at,
    )

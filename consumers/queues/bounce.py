"""The `bounce` queue: classify each bounced recipient, suppress, mark the message, tell others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from jobstream.consumers.mail.addresses import AddressError, normalize_each
from jobstream.consumers.mail.dsn import BouncedRecipient, classify_status
from jobstream.consumers.mail.rawmail import decode_raw
from jobstream.consumers.store import suppressions
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.events import emit
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.parsepool import ParsePool
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import BounceRecipient, ProcessBounce
from jobstream.schema.text import clean_text
from jobstream.streams import Job, Policy

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

__all__ = ["process_bounce"]

_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})
_MAX_ID_CHARS = 998

RECORD_RECIPIENT_SQL = """
INSERT INTO bounce_recipients (job_id, address, kind, sender_side, status, diagnostic, action,
                               remote_mta, original_message_id, mailbox_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (job_id, address) DO NOTHING
"""

LOCK_ADDRESS_SQL = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7106))"

RECORD_SOFT_SQL = """
INSERT INTO soft_bounces (address, job_id, status, diagnostic, sender_side)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (job_id, address) DO NOTHING
"""

COUNT_SOFT_SQL = """
SELECT count(*) FROM soft_bounces
WHERE address = $1 AND NOT sender_side AND bounced_at > now() - make_interval(days => $2)
"""

MARK_BOUNCED_SQL = """
UPDATE outbound_messages SET status = 'bounced', bounced_at = coalesce(bounced_at, now())
WHERE message_id = $1
RETURNING mailbox_id, campaign_id
"""

OUTBOUND_SQL = "SELECT mailbox_id, campaign_id FROM outbound_messages WHERE message_id = $1"


@dataclass(frozen=True, slots=True)
class _Report:
    """What one bounce says, however it arrived."""

    is_bounce: bool
    recipients: list[BouncedRecipient]
    original_message_id: str | None  # without angle brackets


@handler("bounce", ProcessBounce, Policy(max_attempts=5, timeout_s=120, concurrency=16))
async def process_bounce(msg: ProcessBounce, job: Job, deps: Deps) -> dict[str, Any]:
    """Record each bounced recipient, suppress where due, mark the bounced message, emit events.

    Hard bounces (not sender-side) suppress the address; soft ones are counted per address
    and `soft_bounce_limit` of them within `soft_bounce_window_days` suppress it too; a
    5.7.x / policy rejection is the sender's problem and suppresses nobody. Idempotent: the
    recipient and soft-bounce rows are keyed by (job id, address) and the suppression is an
    upsert, all in one transaction; events use the key `<job id>:<address>`, so a rerun
    publishes the same event ids again.
    """
    report = await _read(msg, deps.settings.max_inbound_bytes, deps.parser)
    mailbox_id, campaign_id, marked = msg.mailbox_id, None, False
    suppressed: list[str] = []
    async with deps.pool.acquire() as conn, conn.transaction():
        outbound = await _outbound(conn, report)
        if outbound is not None:
            mailbox_id = outbound["mailbox_id"] or mailbox_id
            campaign_id, marked = outbound["campaign_id"], _is_final(report)
        for recipient in sorted(report.recipients, key=lambda r: r.address):  # lock order
            if await _apply(conn, recipient, job.id, report, mailbox_id, deps.settings):
                suppressed.append(recipient.address)
    published: list[str] = []
    for r in report.recipients:
        published += await _emit_bounce(deps, job, report, r, mailbox_id, campaign_id)
    return {
        "is_bounce": report.is_bounce,
        "recipients": [_shown(r) for r in report.recipients],
        "sender_side": any(r.sender_side for r in report.recipients),
        "original_message_id": report.original_message_id,
        "outbound_marked": marked,
        "suppressed": suppressed,
        "published": len(published),
    }


async def _read(msg: ProcessBounce, limit: int, parser: ParsePool) -> _Report:
    """Parse the raw bounce; the given recipients are used when there is none (or it names none)."""
    report = _Report(is_bounce=False, recipients=[], original_message_id=None)
    if msg.raw_b64 is not None:
        parsed = await parser.parse_bounce(decode_raw(msg.raw_b64, limit))
        report = _Report(parsed.is_bounce, parsed.recipients, parsed.original_message_id)
    if not report.recipients and msg.recipients:
        report = _Report(True, _given(msg.recipients), report.original_message_id)
    recipients = await _normalized(report.recipients)
    message_id = (msg.message_id or report.original_message_id or "").strip()
    message_id = message_id.removeprefix("<").removesuffix(">").strip()
    if not message_id or len(message_id) > _MAX_ID_CHARS:
        return _Report(report.is_bounce, recipients, None)
    return _Report(report.is_bounce, recipients, clean_text(message_id))


async def _normalized(recipients: list[BouncedRecipient]) -> list[BouncedRecipient]:
    """Each recipient once, under the normal form of its address (the form suppressions
    and sending use); one that names no usable address is left out: nothing was sent to it."""
    out: dict[str, BouncedRecipient] = {}
    found = await normalize_each([r.address for r in recipients])
    for r, normal in zip(recipients, found, strict=True):
        if not isinstance(normal, AddressError):
            out.setdefault(normal, msgspec.structs.replace(r, address=normal))
    return list(out.values())


def _given(recipients: list[BounceRecipient]) -> list[BouncedRecipient]:
    """Classify recipients a producer extracted; successful deliveries are no bounce."""
    out: dict[str, BouncedRecipient] = {}
    for r in recipients:
        if r.action in _SUCCESS_ACTIONS:
            continue
        kind, sender_side = classify_status(r.status, r.action, r.diagnostic)
        address = r.address.strip().lower()
        out.setdefault(
            address,
            BouncedRecipient(
                address=address,
                kind=kind,
                status=r.status,
                diagnostic=r.diagnostic,
                action=r.action,
                remote_mta=None,
                sender_side=sender_side,
            ),
        )
    return list(out.values())


def _is_final(report: _Report) -> bool:
    """The message bounced (rather than being delayed) if any recipient failed for good."""
    return any(r.kind == "hard" for r in report.recipients)


async def _outbound(conn: Conn, report: _Report) -> asyncpg.Record | None:
    """The bounced outbound message, marked bounced when the bounce is final."""
    if report.original_message_id is None or not report.recipients:
        return None
    sql = MARK_BOUNCED_SQL if _is_final(report) else OUTBOUND_SQL
    row: asyncpg.Record | None = await conn.fetchrow(sql, report.original_message_id)
    return row


async def _apply(
    conn: Conn,
    r: BouncedRecipient,
    job_id: str,
    report: _Report,
    mailbox_id: str | None,
    settings: Settings,
) -> bool:
    """Record one recipient; suppress it if due. Return whether it is now suppressed."""
    diagnostic = clean_text(r.diagnostic)
    await conn.execute(
        RECORD_RECIPIENT_SQL,
        *(job_id, r.address, r.kind, r.sender_side, clean_text(r.status), diagnostic),
        *(clean_text(r.action), clean_text(r.remote_mta), report.original_message_id, mailbox_id),
    )
    if r.kind == "hard" and not r.sender_side:
        reason = f"hard bounce {r.status or ''}: {diagnostic or 'no diagnostic'}"
        await suppressions.suppress(conn, r.address, reason, job_id)
        return True
    if r.kind != "soft":
        return False
    await conn.execute(LOCK_ADDRESS_SQL, r.address)  # concurrent bounces count in turn
    await conn.execute(
        RECORD_SOFT_SQL, r.address, job_id, clean_text(r.status), diagnostic, r.sender_side
    )
    if r.sender_side:
        return False
    days = settings.soft_bounce_window_days
    count: int = await conn.fetchval(COUNT_SOFT_SQL, r.address, days)
    if count < settings.soft_bounce_limit:
        return False
    reason = f"{count} soft bounces in {days} days, last {r.status or ''}: {diagnostic or ''}"
    await suppressions.suppress(conn, r.address, reason, job_id)
    return True


def _shown(r: BouncedRecipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "kind": r.kind,
        "status": clean_text(r.status),
        "diagnostic": clean_text(r.diagnostic),
        "sender_side": r.sender_side,
    }


async def _emit_bounce(
    deps: Deps,
    job: Job,
    report: _Report,
    r: BouncedRecipient,
    mailbox_id: str | None,
    campaign_id: str | None,
) -> list[str]:
    """The analytics `bounce` event and the platform event `email.bounced` of one recipient."""
    data = {**_shown(r), "message_id": report.original_message_id, "mailbox_id": mailbox_id}
    return await emit(
        deps,
        "email.bounced",
        data,
        key=f"{job.id}:{r.address}",
        mailbox_id=mailbox_id,
        campaign_id=campaign_id,
        message_id=report.original_message_id,
    )

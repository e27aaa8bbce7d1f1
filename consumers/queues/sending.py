"""The `email-sending` queue: send one message over SMTP from a platform mailbox.

Honours suppressions and the mailbox's send limits; stores every message in `outbound_messages`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import asyncpg
import msgspec
from opentelemetry import trace

from jobstream.consumers.mail.addresses import AddressError, normalize_each
from jobstream.consumers.mail.inbound import WARMUP_HEADER
from jobstream.consumers.mail.mime import build_message, message_id_for
from jobstream.consumers.store import sendlimits, suppressions
from jobstream.consumers.store.mailboxes import Mailbox, Relay, get_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.events import emit
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.tls import certificate_problem, client_context
from jobstream.otel import span
from jobstream.otel.redact import scrub
from jobstream.schema.payloads import SendEmail
from jobstream.streams import ConfigError, Job, PermanentError, Policy, RetryableError

__all__ = ["send_email"]

logger = logging.getLogger(__name__)

DONE_SQL = """
SELECT message_id, recipients, smtp_reply, is_warmup, sent_at FROM outbound_messages
WHERE job_id = $1 AND status IN ('sent', 'bounced')
"""
# Claim the message's send for this delivery of the job: a newer delivery (a reclaim)
# takes the claim over, an older one (a replica that was paused) cannot take it back.
SENDING_SQL = """
INSERT INTO outbound_messages (message_id, job_id, mailbox_id, recipients, subject, campaign_id,
                               is_warmup, status, claim_fence)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'sending', $8::numeric)
ON CONFLICT (message_id) DO UPDATE SET status = 'sending', recipients = EXCLUDED.recipients,
                                       claim_fence = EXCLUDED.claim_fence
WHERE outbound_messages.job_id = EXCLUDED.job_id AND outbound_messages.status <> 'sent'
  AND (outbound_messages.claim_fence IS NULL
       OR outbound_messages.claim_fence <= EXCLUDED.claim_fence)
RETURNING message_id
"""
CLAIMED_SQL = "SELECT job_id, status FROM outbound_messages WHERE message_id = $1"
# 'sent', and for a warmup message its day's `sent` count, in one statement.
SENT_SQL = """
WITH upd AS (
    UPDATE outbound_messages SET status = 'sent', smtp_reply = $2, sent_at = now()
    WHERE job_id = $1 AND status = 'sending'
    RETURNING mailbox_id, is_warmup, coalesce($3::date, (now() AT TIME ZONE 'UTC')::date) AS day
)
INSERT INTO warmup_daily AS w (mailbox_id, day, sent)
SELECT mailbox_id, day, 1 FROM upd WHERE is_warmup
ON CONFLICT (mailbox_id, day) DO UPDATE SET sent = w.sent + 1
"""
FAILED_SQL = "UPDATE outbound_messages SET status = 'failed', smtp_reply = $2 WHERE job_id = $1"
_PAUSED_RETRY_S = 300.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """One recipient the relay refused at RCPT."""

    address: str
    code: int
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"[:300]


@handler(
    "email-sending",
    SendEmail,
    Policy(max_attempts=20, backoff_base_s=2, backoff_cap_s=600, timeout_s=120, concurrency=32),
)
async def send_email(msg: SendEmail, job: Job, deps: Deps) -> dict[str, Any]:
    """Send one message over SMTP, once per job id.

    The row in `outbound_messages` is written `sending` before the SMTP transaction and
    `sent` after it, and an attempt that finds its job's row `sent` sends nothing. Still
    at-least-once: if the worker dies (or the attempt times out) after the relay accepted
    the message but before `sent` is committed, the next attempt sends it again, with the
    same Message-ID, so receivers and threading see one message.
    """
    mailbox = await _mailbox(deps, msg.mailbox_id)
    message_id = message_id_for(msg, job.id, mailbox.address)
    warmup_day = _warmup_day(msg)
    done = await deps.pool.fetchrow(DONE_SQL, job.id)
    if done is not None:
        await _emit_sent(deps, msg, job, done["message_id"], list(done["recipients"]))
        return {"status": "sent", "message_id": done["message_id"], "duplicate": True}
    msg = await _normalized(msg)
    recipients, suppressed = await _unsuppressed(deps, msg)
    if not recipients:
        return {"status": "suppressed", "message_id": message_id, "suppressed": suppressed}
    try:
        relay = mailbox.relay(deps.settings.smtp_url)
        email = build_message(
            msg,
            address=mailbox.address,
            display_name=mailbox.display_name,
            message_id=message_id,
            unsubscribe_url=deps.settings.unsubscribe_url,
        )
    except (ConfigError, ValueError) as exc:
        raise PermanentError(str(exc)) from None
    slot = await _reserve(deps, mailbox)
    try:
        claimed = await _mark_sending(
            deps, msg, job, message_id, recipients, warmup_day is not None
        )
    except (PermanentError, RetryableError):
        await sendlimits.release(deps.redis, slot)
        raise
    if not claimed:
        await sendlimits.release(deps.redis, slot)
        return {"status": "sent", "message_id": message_id, "duplicate": True}
    try:
        refused, reply = await _transmit(deps, relay, email, mailbox.address, recipients)
    except (RetryableError, PermanentError) as exc:
        await sendlimits.release(deps.redis, slot)
        await _after_refusal(deps, msg, job, exc)
        raise
    await deps.pool.execute(SENT_SQL, job.id, reply, warmup_day)
    await _hard_bounces(deps, msg, job, [r for r in refused if r.code >= 500])
    delivered = [r for r in recipients if r not in {x.address for x in refused}]
    await _emit_sent(deps, msg, job, message_id, delivered)
    result: dict[str, Any] = {"status": "sent", "message_id": message_id, "smtp_reply": reply}
    result["recipients"] = delivered
    if suppressed or refused:
        result["suppressed"] = suppressed
        result["refused"] = {x.address: x.reply for x in refused}  # 4xx here are not retried
    return result


async def _mailbox(deps: Deps, mailbox_id: str) -> Mailbox:
    mailbox = await get_mailbox(deps.pool, mailbox_id)
    if mailbox is None:
        raise PermanentError(f"no mailbox {mailbox_id}")
    if mailbox.status != "active":
        raise RetryableError(f"mailbox {mailbox_id} is paused", retry_after_s=_PAUSED_RETRY_S)
    return mailbox


def _warmup_day(msg: SendEmail) -> dt.date | None:
    """The planned day of a warmup message (header `<mailbox>:<YYYY-MM-DD>`); None otherwise."""
    value = next((v for k, v in msg.headers.items() if k.lower() == WARMUP_HEADER.lower()), None)
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value.rpartition(":")[2])
    except ValueError:
        return dt.datetime.now(dt.UTC).date()


async def _normalized(msg: SendEmail) -> SendEmail:
    """The payload with every recipient in normal form: the form suppressions are checked
    in, the SMTP envelope carries and the headers show. PermanentError names a bad one."""
    given = [*msg.to, *msg.cc, *msg.bcc]
    normal: list[str] = []
    for found in await normalize_each(given):
        if isinstance(found, AddressError):
            raise PermanentError(f"invalid recipient: {found}")
        normal.append(found)
    to, cc = len(msg.to), len(msg.to) + len(msg.cc)
    try:  # replace() checks the payload again, headers included
        return msgspec.structs.replace(msg, to=normal[:to], cc=normal[to:cc], bcc=normal[cc:])
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


async def _unsuppressed(deps: Deps, msg: SendEmail) -> tuple[list[str], list[str]]:
    """Envelope recipients (normal form, once each) split into allowed and suppressed."""
    wanted = list(dict.fromkeys([*msg.to, *msg.cc, *msg.bcc]))
    blocked = await suppressions.suppressed(deps.pool, wanted)
    return [a for a in wanted if a not in blocked], [a for a in wanted if a in blocked]


async def _reserve(deps: Deps, mailbox: Mailbox) -> sendlimits.Slot:
    slot = await sendlimits.reserve(
        deps.redis, deps.keys, mailbox.id, mailbox.per_minute_limit, mailbox.daily_limit
    )
    if slot.refused is not None:
        raise RetryableError(
            f"mailbox {mailbox.id} reached its {slot.refused} send limit",
            retry_after_s=slot.retry_after_s,
        )
    return slot


async def _mark_sending(
    deps: Deps, msg: SendEmail, job: Job, message_id: str, recipients: list[str], warmup: bool
) -> bool:
    """Claim the send for this delivery; False when this job's message is already sent.

    PermanentError when another job uses the Message-ID; RetryableError when a newer
    delivery of this job holds the claim (this one is stale: its outcome is fenced off).
    """
    args = (message_id, job.id, msg.mailbox_id, recipients, msg.subject, msg.campaign_id, warmup,
            job.fence)  # fmt: skip
    try:
        row = await deps.pool.fetchval(SENDING_SQL, *args)
    except asyncpg.UniqueViolationError:
        row = None
    if row is not None:
        return True
    held = await deps.pool.fetchrow(CLAIMED_SQL, message_id)
    if held is None or held["job_id"] != job.id:
        raise PermanentError(f"Message-ID <{message_id}> is already used by another message")
    if held["status"] == "sent":
        return False  # a concurrent delivery of this job sent it meanwhile
    raise RetryableError(f"a newer delivery of job {job.id} is sending it")


async def _transmit(
    deps: Deps, relay: Relay, email: EmailMessage, sender: str, recipients: list[str]
) -> tuple[list[Refusal], str]:
    """One SMTP transaction; the recipients refused at RCPT and the relay's final reply.

    Raises RetryableError on 4xx and connection trouble, PermanentError on 5xx; the
    messages name the relay without its password and never carry the AUTH exchange.
    """
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        use_tls=relay.use_tls,
        start_tls=relay.start_tls,
        username=relay.username,
        password=relay.password,
        timeout=deps.settings.smtp_timeout_s,
        tls_context=client_context(deps.settings, "smtp"),
    )
    attrs: dict[str, str | int] = {"server.address": relay.host, "server.port": relay.port}
    with span("smtp send", attrs, kind=trace.SpanKind.CLIENT, recipients=len(recipients)):
        return await _smtp_transaction(smtp, relay, email, sender, recipients)


async def _smtp_transaction(
    smtp: aiosmtplib.SMTP, relay: Relay, email: EmailMessage, sender: str, recipients: list[str]
) -> tuple[list[Refusal], str]:
    # A relay's reply may quote what it was sent, credentials included: scrubbed.
    try:
        async with smtp:
            errors, reply = await smtp.send_message(email, sender=sender, recipients=recipients)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        raise _all_refused(exc) from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise _by_code(exc.code, f"relay {relay.shown} refused AUTH ({exc.code})") from None
    except aiosmtplib.SMTPResponseException as exc:
        text = scrub(exc.message[:200])
        raise _by_code(exc.code, f"relay {relay.shown}: {exc.code} {text}") from None
    except aiosmtplib.SMTPNotSupported as exc:
        raise PermanentError(f"relay {relay.shown}: {scrub(exc.message[:200])}") from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise _unreachable(relay, exc) from None
    refused = [Refusal(a, r.code, scrub(r.message)) for a, r in errors.items()]
    return refused, scrub(f"250 {reply}"[:300])


def _unreachable(relay: Relay, exc: BaseException) -> RetryableError:
    """Retryable, as MTAs defer on TLS failures (a refused certificate, no STARTTLS offered
    when the URL asks for it): the relay may be fixed. aiosmtplib's messages carry no
    credentials; AUTH replies never reach here."""
    problem = certificate_problem(exc)
    if problem is not None:
        return RetryableError(
            f"relay {relay.shown}: TLS certificate of the relay refused: {problem}"
        )
    said = f": {scrub(exc.message[:200])}" if isinstance(exc, aiosmtplib.SMTPException) else ""
    return RetryableError(f"relay {relay.shown} unreachable: {type(exc).__name__}{said}")


class _AllRefused(PermanentError):
    """Every recipient refused with 5xx: a hard bounce for each."""

    def __init__(self, message: str, refusals: list[Refusal]) -> None:
        super().__init__(message)
        self.refusals = refusals


class _SomeDeferred(RetryableError):
    """Every recipient refused, some only for now (4xx): hard-bounce the 5xx ones, retry."""

    def __init__(self, message: str, refusals: list[Refusal]) -> None:
        super().__init__(message)
        self.refusals = refusals


def _all_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> PermanentError | RetryableError:
    refusals = [Refusal(r.recipient, r.code, r.message) for r in exc.recipients]
    hard = [r for r in refusals if r.code >= 500]
    replies = "; ".join(f"{r.address}: {r.reply}" for r in refusals)[:500]
    if len(hard) == len(refusals):
        return _AllRefused(f"relay refused every recipient: {replies}", hard)
    return _SomeDeferred(f"relay deferred recipients: {replies}", hard)


def _by_code(code: int, message: str) -> PermanentError | RetryableError:
    return PermanentError(message) if code >= 500 else RetryableError(message)


async def _after_refusal(
    deps: Deps, msg: SendEmail, job: Job, exc: RetryableError | PermanentError
) -> None:
    """Record what a failed transaction teaches: hard bounces, and `failed` when permanent."""
    hard = getattr(exc, "refusals", [])
    await _hard_bounces(deps, msg, job, hard)
    if isinstance(exc, PermanentError):
        await deps.pool.execute(FAILED_SQL, job.id, str(exc)[:500])


async def _hard_bounces(deps: Deps, msg: SendEmail, job: Job, refused: list[Refusal]) -> None:
    """Suppress each address refused with 5xx and tell the platform it bounced."""
    for r in refused:
        await suppressions.suppress(deps.pool, r.address, f"smtp {r.reply}", job.id)
        await emit(
            deps,
            "email.bounced",
            {"recipient": r.address, "kind": "hard", "smtp_reply": r.reply, "job_id": job.id},
            key=f"{job.id}:rcpt:{r.address}",
            mailbox_id=msg.mailbox_id,
            campaign_id=msg.campaign_id,
        )


async def _emit_sent(
    deps: Deps, msg: SendEmail, job: Job, message_id: str, recipients: list[str]
) -> None:
    data = {
        "message_id": message_id,
        "mailbox_id": msg.mailbox_id,
        "recipients": recipients,
        "subject": msg.subject,
        "campaign_id": msg.campaign_id,
        "job_id": job.id,
        "warmup": _warmup_day(msg) is not None,
    }
    await emit(
        deps,
        "email.sent",
        data,
        key=job.id,
        mailbox_id=msg.mailbox_id,
        campaign_id=msg.campaign_id,
        message_id=message_id,
    )

"""The mail part of `jobstream demo`: real jobs through sending, processing, bounce, warmup
and webhook, against a loopback SMTP sink and webhook receiver; prints what each queue did."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from jobstream.consumers.cli import ops
from jobstream.consumers.demo.http_sink import Answer, HttpSink, verify_signature
from jobstream.consumers.demo.smtp_sink import Sink
from jobstream.consumers.mail.inbound import WARMUP_HEADER
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.store.webhooks import add_endpoint, disable_endpoint
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.registry import by_queue
from jobstream.schema.payloads import ProcessEmail, RunWarmup, SendEmail
from jobstream.streams import Status

__all__ = ["run_mail_demo"]

DONE_SQL = """
SELECT count(*) FROM jobs WHERE id = ANY($1::text[]) AND status IN ('completed', 'failed')
"""
ACTIVE_SQL = """
SELECT count(*) FROM jobs
WHERE created_at >= $1 AND status NOT IN ('completed', 'failed')
  AND (payload->>'mailbox_id' LIKE $2 OR payload->>'endpoint_id' = $3)
"""
QUEUES_SQL = """
SELECT queue, status, count(*) AS n FROM jobs
WHERE created_at >= $1 AND (payload->>'mailbox_id' LIKE $2 OR payload->>'endpoint_id' = $3)
GROUP BY queue, status ORDER BY queue, status
"""
OUTBOUND_SQL = """
SELECT status, is_warmup, count(*) AS n FROM outbound_messages WHERE mailbox_id LIKE $1
GROUP BY status, is_warmup ORDER BY status, is_warmup
"""
MESSAGE_IDS_SQL = """
SELECT job_id, message_id, subject FROM outbound_messages WHERE job_id = ANY($1::text[])
"""
INBOUND_SQL = """
SELECT classification, count(*) AS n FROM inbound_messages WHERE mailbox_id LIKE $1
GROUP BY classification ORDER BY classification
"""
WARMUP_SQL = """
SELECT sum(target) AS target, sum(sent) AS sent, sum(received) AS received
FROM warmup_daily WHERE mailbox_id LIKE $1
"""
WARMUP_SENT_SQL = """
SELECT count(*) FROM outbound_messages WHERE mailbox_id LIKE $1 AND is_warmup AND status = 'sent'
"""
DELIVERIES_SQL = """
SELECT coalesce(status_code::text, 'no answer') AS code, count(*) AS n FROM webhook_deliveries
WHERE endpoint_id = $1 GROUP BY 1 ORDER BY 1
"""
MAILBOX_BY_ADDRESS_SQL = "SELECT id FROM mailboxes WHERE address = lower($1)"
RETIRE_SQL = """
UPDATE mailboxes SET warmup_enabled = false, status = 'paused', updated_at = now()
WHERE id LIKE $1
"""
SUPPRESSED_SQL = "SELECT count(*) FROM suppressions WHERE source_job_id LIKE $1"
JOB_RESULTS_SQL = """
SELECT coalesce(result->>'status', status) AS status, count(*) AS n FROM jobs
WHERE id = ANY($1::text[]) GROUP BY 1
"""


async def _settle(
    deps: Deps, since: dt.datetime, run: str, ep: str, timeout_s: float, ids: Sequence[str] = ()
) -> None:
    """Wait until the jobs `ids` are done, then until no job of this run is queued, running
    or retrying and no stream has undelivered entries, twice in a row."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        await asyncio.sleep(0.25)
        if ids and await deps.pool.fetchval(DONE_SQL, list(ids)) < len(set(ids)):
            continue
        active = await deps.pool.fetchval(ACTIVE_SQL, since, f"{run}-%", ep)
        lag = sum(r.get("lag") or 0 for r in await ops.queue_status(deps))
        quiet = quiet + 1 if active == 0 and lag == 0 else 0
    if quiet < 2:
        raise TimeoutError(f"mail jobs of {run} still running after {timeout_s:.0f}s")


async def _wait_sent(deps: Deps, run: str, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    sent = 0
    while time.monotonic() < deadline:
        sent = int(await deps.pool.fetchval(WARMUP_SENT_SQL, f"{run}-%"))
        if sent >= want:
            break
        await asyncio.sleep(0.5)
    return sent


def _raw_reply(to: str, sender: str, message_id: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Customer Zero <{sender}>"
    msg["To"] = to
    msg["Subject"] = f"Re: {subject}"
    msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    msg["Message-ID"] = make_msgid(domain="example.net")
    msg["In-Reply-To"] = f"<{message_id}>"
    msg["References"] = f"<{message_id}>"
    msg.set_content("Sounds good, let's talk on Tuesday.\n\n> earlier message quoted here\n")
    return msg.as_bytes()


def _raw_dsn(to: str, recipient: str, message_id: str, subject: str) -> bytes:
    date = format_datetime(dt.datetime.now(dt.UTC))
    text = f"""From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: {to}
Subject: Undelivered Mail Returned to Sender
Date: {date}
Message-ID: {make_msgid(domain="mx.example.net")}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="dsn-b"

--dsn-b
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered to {recipient}: the mailbox does not exist.

--dsn-b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected

--dsn-b
Content-Type: text/rfc822-headers

From: {to}
To: {recipient}
Subject: {subject}
Message-ID: <{message_id}>

--dsn-b--
"""
    return text.replace("\n", "\r\n").encode()


async def _inbound(deps: Deps, mailbox_id: str, raw: bytes) -> str:
    payload = ProcessEmail(mailbox_id=mailbox_id, raw_b64=base64.b64encode(raw).decode())
    return await deps.publisher.publish("email:processing", payload)


async def _setup(deps: Deps, run: str, sink: Sink, hooks: HttpSink) -> tuple[str, str]:
    for name in ("alice", "bob", "carol"):
        await add_mailbox(
            deps.pool,
            f"{name}.{run}@demo.test",
            mailbox_id=f"{run}-{name}",
            display_name=name.title(),
            smtp_url=sink.url(),
            per_minute_limit=120,
            warmup=True,
        )
    return await add_endpoint(deps.pool, hooks.url())


async def _send(deps: Deps, run: str, sink: Sink) -> list[str]:
    """Four campaign messages (one deferred once by the relay), one refused with 550."""
    sink.data_replies.append("451 4.3.0 demo: try again later")
    nobody = f"nobody.{run}@example.net"
    sink.refuse_rcpt[nobody] = "550 5.1.1 demo: no such user"
    sends = [
        SendEmail(
            mailbox_id=f"{run}-alice",
            to=[f"customer{i}.{run}@example.net"],  # unique: a DSN below suppresses one
            subject=f"Spring offer #{i}",
            text=f"Hello customer {i}, our spring offer is here.",
            html=f"<p>Hello customer {i}, our <b>spring offer</b> is here.</p>",
            campaign_id=f"{run}-spring",
        )
        for i in range(4)
    ]
    sends.append(SendEmail(mailbox_id=f"{run}-alice", to=[nobody], subject="Hi", text="Hi"))
    ids = [f"{run}-send-{i}" for i in range(len(sends))]
    await deps.publisher.publish_many("email-sending", sends, ids)
    return ids


async def _receive(deps: Deps, run: str, send_ids: list[str]) -> list[str]:
    """A reply to message 0 and a DSN for message 1 through email:processing."""
    if "email:processing" not in by_queue():
        print("email:processing has no handler in this build: reply and bounce steps skipped")
        return []
    rows = {r["job_id"]: r for r in await deps.pool.fetch(MESSAGE_IDS_SQL, send_ids[:2])}
    alice = f"alice.{run}@demo.test"
    first, second = rows[send_ids[0]], rows[send_ids[1]]
    reply = _raw_reply(alice, f"customer0.{run}@example.net", first["message_id"], first["subject"])
    dsn = _raw_dsn(alice, f"customer1.{run}@example.net", second["message_id"], second["subject"])
    return [await _inbound(deps, f"{run}-alice", reply), await _inbound(deps, f"{run}-alice", dsn)]


async def _warmup(deps: Deps, run: str, sink: Sink, since: dt.datetime, ep: str) -> int:
    """One warmup day for the three mailboxes; the warmup mail the sink receives is fed back
    to email:processing as the peer mailbox's inbound mail."""
    day = dt.datetime.now(dt.UTC).date()
    already = len(sink.messages)
    jobs = [RunWarmup(mailbox_id=f"{run}-{n}", day=day) for n in ("alice", "bob", "carol")]
    await _settle(deps, since, run, ep, 20, await deps.publisher.publish_many("warmup", jobs))
    target = int(await deps.pool.fetchval(WARMUP_SQL, f"{run}-%") or 0)
    sent = await _wait_sent(deps, run, target, 30)
    print(f"warmup: planned {target} messages between the 3 mailboxes, {sent} sent")
    if "email:processing" in by_queue():
        for m in sink.messages[already:]:
            to = m.rcpt_tos
            peer = await deps.pool.fetchval(MAILBOX_BY_ADDRESS_SQL, to[0]) if to else None
            if peer is not None and WARMUP_HEADER.lower().encode() in m.data.lower():
                await _inbound(deps, peer, m.data)
    return sent


async def run_mail_demo(deps: Deps, run: str, sink: Sink, hooks: HttpSink) -> bool:
    """Run the mail scenario with the workers already started; True when it checks out."""
    since: dt.datetime = await deps.pool.fetchval("SELECT now()")
    ep, secret = await _setup(deps, run, sink, hooks)
    hooks.answers.append(Answer(503, {"retry-after": "1"}))  # one webhook retried
    print(f"mail: 3 mailboxes, webhook endpoint {ep} -> {hooks.url()}")
    try:
        send_ids = await _send(deps, run, sink)
        await _settle(deps, since, run, ep, 30, send_ids)
        again = SendEmail(
            mailbox_id=f"{run}-alice", to=[f"nobody.{run}@example.net"], subject="Hi", text="Hi"
        )
        send_ids.append(await deps.publisher.publish("email-sending", again, f"{run}-send-again"))
        inbound = await _receive(deps, run, send_ids)
        await _settle(deps, since, run, ep, 30, [send_ids[-1], *inbound])
        await _warmup(deps, run, sink, since, ep)
        await _settle(deps, since, run, ep, 30)
        return await _report(deps, run, since, ep, secret, sink, hooks, send_ids)
    finally:  # leave nothing that later runs would deliver to or warm up with
        await disable_endpoint(deps.pool, ep, "demo finished")
        await deps.pool.execute(RETIRE_SQL, f"{run}-%")


async def _report(
    deps: Deps,
    run: str,
    since: dt.datetime,
    ep: str,
    secret: str,
    sink: Sink,
    hooks: HttpSink,
    send_ids: list[str],
) -> bool:
    pool, like = deps.pool, f"{run}-%"
    table: dict[str, dict[str, int]] = {}
    for r in await pool.fetch(QUEUES_SQL, since, like, ep):
        table.setdefault(r["queue"], {})[r["status"]] = int(r["n"])
    print(f"{'queue':<18} {'completed':>9} {'failed':>7}   (jobs of this run)")
    for queue in ("email-sending", "email:processing", "bounce", "warmup", "webhook", "analytics"):
        counts = table.get(queue, {})
        done, failed = counts.get(Status.COMPLETED, 0), counts.get(Status.FAILED, 0)
        print(f"{queue:<18} {done:>9} {failed:>7}")
    results = {r["status"]: int(r["n"]) for r in await pool.fetch(JOB_RESULTS_SQL, send_ids)}
    outbound = {
        (r["status"], r["is_warmup"]): int(r["n"]) for r in await pool.fetch(OUTBOUND_SQL, like)
    }
    delivered = sum(n for (status, _), n in outbound.items() if status in ("sent", "bounced"))
    suppressed = await pool.fetchval(SUPPRESSED_SQL, like)
    print(
        f"email-sending: outbound {_fmt(outbound)}; job results {results}; "
        f"{suppressed} address suppressed by a 550; the SMTP sink received {len(sink.messages)}"
    )
    inbound = {r["classification"]: int(r["n"]) for r in await pool.fetch(INBOUND_SQL, like)}
    print(f"email:processing: inbound messages stored {inbound or 'none'}")
    bounced = sum(n for (status, _), n in outbound.items() if status == "bounced")
    print(f"bounce: {bounced} outbound message marked bounced from a DSN")
    warm = dict((await pool.fetchrow(WARMUP_SQL, like)) or {})
    print("warmup: " + ", ".join(f"{k} {warm.get(k)}" for k in ("target", "sent", "received")))
    codes = {r["code"]: int(r["n"]) for r in await pool.fetch(DELIVERIES_SQL, ep)}
    valid = sum(verify_signature(secret, r.headers, r.body) for r in hooks.requests)
    print(
        f"webhook: attempts by answer {codes}; the receiver got {len(hooks.requests)} requests, "
        f"{valid} with a valid signature"
    )
    ok = delivered == len(sink.messages) and valid == len(hooks.requests) > 0
    print("one message per sent job, every webhook signed" if ok else "MAIL CHECKS FAILED")
    return ok


def _fmt(outbound: dict[tuple[str, bool], int]) -> str:
    parts = [f"{s}{' (warmup)' if w else ''}={n}" for (s, w), n in sorted(outbound.items())]
    return ", ".join(parts) or "none"

"""The email:processing queue end to end: store, classify, fan out, fail bad input for good."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jobstream.consumers.mail.inbound import parse_message
from jobstream.consumers.mail.rawmail import decode_raw
from jobstream.consumers.queues.processing import bounce_job_id, inbound_key, process_email
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import ProcessEmail
from jobstream.streams import Job, PermanentError
from tests.helpers import add_outbound, eventually, finished, result, running

DATA = Path(__file__).parents[1] / "data"
INBOUND = DATA / "inbound"
FILES = sorted(INBOUND.iterdir())
QUEUES = ["email:processing", "bounce", "analytics"]
OURS = "0193f2a0-7c1e-7b7a-9a51-3f0c2d9e4b11@mailbox.example.com"

# Files whose defects the stored row must show.
DEFECTIVE = {
    "msg_35.txt": "missing header/body separator",
    "headers_only.eml": "missing header/body separator",
    "msg_17.txt": "start boundary not found",
    "msg_41.txt": "no boundary in multipart",
    "truncated_multipart.eml": "close boundary not found",
    "latin1_subject.eml": "subject: 8-bit bytes",
    "charset_x_unknown.eml": "undecodable charset x-unknown",
}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def publish(deps: Deps, job_id: str, raw: bytes, mailbox: str = "mb-in") -> str:
    payload = ProcessEmail(mailbox_id=mailbox, raw_b64=b64(raw))
    return await deps.publisher.publish("email:processing", payload, job_id)


async def test_every_inbound_file_is_stored(deps: Deps) -> None:
    ids = [await publish(deps, f"in-{p.name}", p.read_bytes()) for p in FILES]
    async with running(make_engine(deps, QUEUES)):
        rows = await finished(deps, *ids)
    assert [r["status"] for r in rows] == ["completed"] * len(FILES)
    for path, row in zip(FILES, rows, strict=True):
        raw = path.read_bytes()
        parsed = parse_message(raw)
        key, has_id = inbound_key(parsed.message_id, raw)
        stored = await deps.pool.fetchrow(
            "SELECT * FROM inbound_messages WHERE mailbox_id = 'mb-in' AND message_id = $1", key
        )
        assert stored is not None, path.name
        assert stored["has_message_id"] is has_id
        assert stored["defects"] == parsed.defects, path.name
        assert stored["size_bytes"] == len(raw)
        assert stored["classification"] == result(row)["classification"]
        assert result(row)["stored"] is True
        assert result(row)["defects"] == len(parsed.defects)
        assert len(json.loads(stored["attachments"])) == len(parsed.attachments)
        if path.name in DEFECTIVE:
            assert DEFECTIVE[path.name] in stored["defects"], path.name
    count = await deps.pool.fetchval("SELECT count(*) FROM inbound_messages")
    assert count == len(FILES)


async def test_attachments_and_fields_are_stored(deps: Deps) -> None:
    job_id = await publish(deps, "in-attach", (INBOUND / "rfc2047_malformed.eml").read_bytes())
    reply_id = await publish(deps, "in-reply", (INBOUND / "reply_in_reply_to.eml").read_bytes())
    async with running(make_engine(deps, QUEUES)):
        await finished(deps, job_id, reply_id)
    row = await deps.pool.fetchrow(
        "SELECT * FROM inbound_messages WHERE message_id = 'no-brackets-id@example.de'"
    )
    attachments = json.loads(row["attachments"])
    assert len(attachments) == 2
    assert all({"filename", "content_type", "size"} <= set(a) for a in attachments)
    assert row["job_id"] == "in-attach"
    reply = await deps.pool.fetchrow(
        "SELECT * FROM inbound_messages WHERE message_id = 'CAF=reply.1@mail.example.org'"
    )
    assert reply["subject"] == "Re: Café meeting next week"
    assert reply["from_email"] == "zoe.mueller@example.org"
    assert reply["in_reply_to"] == OURS
    assert reply["reference_ids"] == ["older-thread-start@mail.example.org", OURS]
    assert reply["to_addrs"] == ["sales@mailbox.example.com", "second@mailbox.example.com"]
    assert reply["cc_addrs"] == ["boss@example.org"]
    assert reply["classification"] == "other"  # nothing in outbound_messages yet


async def test_processing_twice_stores_once(deps: Deps) -> None:
    raw = (INBOUND / "msg_07.txt").read_bytes()  # no Message-ID: keyed by its digest
    first = await publish(deps, "twice-1", raw)
    second = await publish(deps, "twice-2", raw)
    async with running(make_engine(deps, QUEUES)):
        rows = await finished(deps, first, second)
    assert sorted(result(r)["stored"] for r in rows) == [False, True]
    assert {result(r)["message_id"] for r in rows} == {inbound_key(None, raw)[0]}
    assert await deps.pool.fetchval("SELECT count(*) FROM inbound_messages") == 1


async def test_dsn_publishes_a_bounce_job_that_suppresses(deps: Deps) -> None:
    raw = (DATA / "bounces_extra" / "messages" / "office365_01.eml").read_bytes()
    await add_outbound(deps, "20260303091400.4242.abc@mail.example.org", "mb-out")
    job_id = await publish(deps, "dsn-1", raw, mailbox="mb-bounces")
    key, _ = inbound_key(parse_message(raw).message_id, raw)
    bounce_id = bounce_job_id("mb-bounces", key)
    async with running(make_engine(deps, QUEUES)):
        (row,) = await finished(deps, job_id)
        assert result(row)["classification"] == "bounce"
        assert result(row)["published"] == [bounce_id]
        (bounce,) = await finished(deps, bounce_id)
        await eventually(
            lambda: deps.pool.fetchval("SELECT count(*) FROM analytics_events WHERE type='bounce'")
        )
    assert bounce["status"] == "completed"
    assert [r["address"] for r in result(bounce)["recipients"]] == ["nobody@example.com"]
    suppression = await deps.pool.fetchrow(
        "SELECT * FROM suppressions WHERE address = 'nobody@example.com'"
    )
    assert suppression["source_job_id"] == bounce_id
    outbound = await deps.pool.fetchrow("SELECT status, bounced_at FROM outbound_messages")
    assert outbound["status"] == "bounced"
    assert outbound["bounced_at"] is not None
    event = await deps.pool.fetchrow("SELECT * FROM analytics_events WHERE type = 'bounce'")
    assert (event["mailbox_id"], event["campaign_id"]) == ("mb-out", "cmp-1")
    assert event["message_id"] == "20260303091400.4242.abc@mail.example.org"


async def test_reply_publishes_the_analytics_reply_event(deps: Deps) -> None:
    await add_outbound(deps, OURS, "mb-1")
    raw = (INBOUND / "reply_in_reply_to.eml").read_bytes()
    ids = [await publish(deps, f"reply-{i}", raw, mailbox="mb-1") for i in (1, 2)]
    async with running(make_engine(deps, QUEUES)):
        rows = await finished(deps, *ids)
        assert {result(r)["classification"] for r in rows} == {"reply"}

        async def replies() -> list[Any]:
            return await deps.pool.fetch("SELECT * FROM analytics_events WHERE type = 'reply'")

        (event,) = await eventually(replies)
    assert (event["mailbox_id"], event["campaign_id"], event["message_id"]) == (
        "mb-1",
        "cmp-1",
        OURS,
    )
    properties = json.loads(event["properties"])
    assert properties["reply_message_id"] == "CAF=reply.1@mail.example.org"
    assert properties["from"] == "zoe.mueller@example.org"
    daily = await deps.pool.fetchval(
        "SELECT count FROM analytics_daily_campaign WHERE campaign_id = 'cmp-1' AND type = 'reply'"
    )
    assert daily == 1  # two runs, one event


async def test_warmup_counts_once_even_if_processed_twice(deps: Deps) -> None:
    await add_outbound(deps, "wm-7f3a9c@warm.example.net", "mb-warm", warmup=True, day=5)
    await add_outbound(deps, OURS, "mb-peer", warmup=True, day=4)
    raw = (INBOUND / "warmup.eml").read_bytes()
    ids = [await publish(deps, f"warm-{i}", raw, mailbox="mb-peer") for i in (1, 2)]
    async with running(make_engine(deps, QUEUES)):
        rows = await finished(deps, *ids)
    assert {result(r)["classification"] for r in rows} == {"warmup"}
    counted = [result(r)["warmup"] for r in rows if result(r)["stored"]]
    assert counted == [{"received_by": "mb-warm", "day": "2026-03-05", "replied_to": "mb-peer"}]
    daily = {
        (r["mailbox_id"], r["day"]): (r["received"], r["replied"])
        for r in await deps.pool.fetch("SELECT * FROM warmup_daily")
    }
    assert daily == {
        ("mb-warm", dt.date(2026, 3, 5)): (1, 0),
        ("mb-peer", dt.date(2026, 3, 4)): (0, 1),
    }


@pytest.mark.parametrize(
    "header", ["mb-a:2026-03-07", "pair=wp_2; mailbox=mb-a; day=2026-03-07", "mb-a:not-a-day"]
)
async def test_warmup_sender_named_by_the_header(deps: Deps, header: str) -> None:
    raw = (
        "From: a@warm.example.net\r\nTo: b@mailbox.example.com\r\nSubject: hi\r\n"
        f"Message-ID: <wm-2@warm.example.net>\r\nX-Jobstream-Warmup: {header}\r\n\r\nHello.\r\n"
    ).encode()
    payload = ProcessEmail(
        mailbox_id="mb-b",
        raw_b64=b64(raw),
        received_at=dt.datetime(2026, 3, 8, 1, 0, tzinfo=dt.UTC),
    )
    job_id = await deps.publisher.publish("email:processing", payload, "warm-header")
    async with running(make_engine(deps, QUEUES)):
        (row,) = await finished(deps, job_id)
    day = "2026-03-08" if header.endswith("not-a-day") else "2026-03-07"  # else: received day
    assert result(row)["warmup"] == {"received_by": "mb-a", "day": day, "replied_to": None}
    rows = await deps.pool.fetch("SELECT mailbox_id, day::text, received FROM warmup_daily")
    assert [tuple(r) for r in rows] == [("mb-a", day, 1)]


async def test_oversize_and_bad_base64_fail_permanently(deps: Deps) -> None:
    settings = msgspec.structs.replace(deps.settings, max_inbound_bytes=1000)
    small = dataclasses.replace(deps, settings=settings)
    big = await publish(deps, "too-big", b"Subject: big\r\n\r\n" + b"x" * 2000)
    bad = await deps.publisher.publish(
        "email:processing", ProcessEmail(mailbox_id="mb-in", raw_b64="not base64 at all!"), "bad"
    )
    async with running(make_engine(small, QUEUES)):
        rows = await finished(deps, big, bad)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "1000 bytes" in rows[0]["error"]
    assert "base64" in rows[1]["error"]
    attempts = await deps.pool.fetch("SELECT attempts FROM jobs WHERE id = ANY($1)", [big, bad])
    assert [r["attempts"] for r in attempts] == [1, 1]
    dead = await deps.redis.xrange(deps.keys.dead("email:processing"))
    assert sorted(fields[b"id"].decode() for _, fields in dead) == ["bad", "too-big"]
    assert {fields[b"reason"] for _, fields in dead} == {b"permanent"}
    assert await deps.pool.fetchval("SELECT count(*) FROM inbound_messages") == 0


def test_decode_raw_accepts_folded_base64_and_names_the_limit() -> None:
    raw = b"Subject: x\r\n\r\n" + b"body " * 100
    folded = base64.encodebytes(raw).decode()  # 76-character lines
    assert decode_raw(folded, 10_000) == raw
    with pytest.raises(PermanentError, match="limit of 10 bytes"):
        decode_raw(folded, 10)
    with pytest.raises(PermanentError, match="not valid base64"):
        decode_raw("abc", 10_000)


def test_inbound_key() -> None:
    assert inbound_key("id@example.org", b"x") == ("id@example.org", True)
    key, has_id = inbound_key(None, b"x")
    assert key.startswith("sha256:")
    assert not has_id
    assert inbound_key("a" * 600, b"x") == (key, False)  # too long to index as it is


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: nul \x00 here\r\nMessage-ID: <nul\x00id@example.org>\r\n\r\nbody \x00 text",
        b"Content-Type: text/pl\xffain; charset=\xfe\r\nFrom: \xff@\xfe\r\n\r\n\xff\xfe body",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: application/'
        b'octet-stream; name="a\x00\xff.bin"\r\nContent-Disposition: attachment\r\n\r\nxx\r\n',
        b"In-Reply-To: <" + b"x" * 5000 + b"@example.org>\r\nReferences: " + b"<r@e> " * 3000,
        b"\r\n",
    ],
    ids=["nul", "8bit-content-type", "nul-filename", "huge-ids", "blank"],
)
async def test_hostile_messages_are_stored(deps: Deps, raw: bytes) -> None:
    payload = ProcessEmail(mailbox_id="mb-in", raw_b64=b64(raw))
    job = Job("hostile", "email:processing", 1, "0-1", 0)
    out = await process_email.fn(payload, job, deps)
    assert out["stored"] is True
    row = await deps.pool.fetchrow(
        "SELECT * FROM inbound_messages WHERE message_id = $1", out["message_id"]
    )
    assert row["classification"] == out["classification"]
    again = await process_email.fn(payload, job, deps)
    assert again["stored"] is False


async def test_follow_ups_are_republished_only_by_a_retry(deps: Deps) -> None:
    raw = (DATA / "bounces_extra" / "messages" / "gmail_01.eml").read_bytes()
    payload = ProcessEmail(mailbox_id="mb-in", raw_b64=b64(raw))
    first = await process_email.fn(payload, Job("p-1", "email:processing", 1, "0-1", 0), deps)
    bounce_id = bounce_job_id("mb-in", first["message_id"])
    assert (first["stored"], first["published"]) == (True, [bounce_id])
    duplicate = await process_email.fn(payload, Job("p-2", "email:processing", 1, "0-2", 0), deps)
    assert (duplicate["stored"], duplicate["published"]) == (False, [])
    retry = await process_email.fn(payload, Job("p-1", "email:processing", 2, "0-3", 0), deps)
    assert (retry["stored"], retry["published"]) == (False, [bounce_id])
    entries = await deps.redis.xrange(deps.keys.stream("bounce"))
    assert [fields[b"id"].decode() for _, fields in entries] == [bounce_id, bounce_id]

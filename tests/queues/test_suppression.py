"""Suppressions hold against every spelling of an address: bounce, SMTP refusal and send
agree on one normal form, against a real SMTP server, PostgreSQL and Redis."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec
import pytest

from jobstream.consumers.demo.smtp_sink import Sink, smtp_sink
from jobstream.consumers.mail.addresses import normalize_address
from jobstream.consumers.queues.bounce import process_bounce
from jobstream.consumers.queues.sending import send_email
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.migrate import (
    CREATE_VERSIONS_SQL,
    RECORD_SQL,
    apply_migrations,
    load_migrations,
)
from jobstream.schema.payloads import BounceRecipient, ProcessBounce, SendEmail
from jobstream.streams import Job, PermanentError
from tests.helpers import eventually, running

# Each is accepted by the payload (one @, no whitespace) and names a suppressed mailbox.
SPELLINGS = [
    "<victim@example.com>",
    "victim@example.com(comment)",
    "x<victim@example.com>",
    '"victim"@example.com',
    '"vic\\tim"@example.com',
    "VICTIM@EXAMPLE.COM",
    "victim@Example.Com",
    "(c)victim(d)@(e)example.com",
    "<@relay.example:victim@example.com>",
    "victim@example.com,",
    "victim@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
    "victim@bücher.example",
    "victim@BÜCHER.example",
    "victim@XN--BCHER-KVA.example",
    '"victim"@xn--bcher-kva.example',
]
# Each is refused outright: not exactly one mailbox.
REFUSED = [
    "victim@example.com.",
    "group:victim@example.com;",
    "victim@example.com,other",
    "victim@(no-domain)",
    "=?utf-8?q?V?=<victim@example.com>",
]


def sending_job(job_id: str) -> Job:
    return Job(job_id, "email-sending", 1, "0-1", int(time.time() * 1000))


def bounce_job(job_id: str) -> Job:
    return Job(job_id, "bounce", 1, "0-1", 0)


def bounce(address: str, status: str, diagnostic: str = "550 user unknown") -> ProcessBounce:
    given = BounceRecipient(address=address, status=status, diagnostic=diagnostic)
    return ProcessBounce(recipients=[given], mailbox_id="mb-a")


def mail(*to: str, **kw: Any) -> SendEmail:
    return SendEmail(mailbox_id="mb-a", to=list(to), subject="s", text="t", **kw)


async def suppressions(deps: Deps) -> set[str]:
    return {r["address"] for r in await deps.pool.fetch("SELECT address FROM suppressions")}


def rcpts(sink: Sink) -> list[list[str]]:
    return [m.rcpt_tos for m in sink.messages]


async def test_no_spelling_of_a_suppressed_address_is_delivered(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        await process_bounce.fn(bounce("Victim@Example.COM", "5.1.1"), bounce_job("b1"), deps)
        await process_bounce.fn(bounce("victim@bücher.example", "5.1.1"), bounce_job("b2"), deps)
        assert await suppressions(deps) == {"victim@example.com", "victim@xn--bcher-kva.example"}
        for i, text in enumerate(SPELLINGS):
            out = await send_email.fn(mail(text), sending_job(f"alone-{i}"), deps)
            assert out["status"] == "suppressed", text
            assert out["suppressed"] == [normalize_address(text)]
        assert sink.messages == []
        for i, text in enumerate(SPELLINGS):
            both = mail("friend@example.net", cc=[text])
            out = await send_email.fn(both, sending_job(f"mixed-{i}"), deps)
            assert out["recipients"] == ["friend@example.net"], text
        assert rcpts(sink) == [["friend@example.net"]] * len(SPELLINGS)
        for i, text in enumerate(REFUSED):
            with pytest.raises(PermanentError, match="invalid recipient") as err:
                await send_email.fn(mail(text), sending_job(f"refused-{i}"), deps)
            assert "\n" not in str(err.value)
        assert len(sink.messages) == len(SPELLINGS)
        assert await deps.pool.fetchval("SELECT count(*) FROM outbound_messages") == len(SPELLINGS)


async def test_a_bounce_in_any_spelling_suppresses_the_one_mailbox(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        out = await process_bounce.fn(bounce("x<gone@Example.net>", "5.1.1"), bounce_job("h"), deps)
        assert out["suppressed"] == ["gone@example.net"]
        assert [r["address"] for r in out["recipients"]] == ["gone@example.net"]
        soft = ["<full@example.net>", '"full"@example.net', "FULL@example.net(c)"]
        for i, text in enumerate(soft):
            out = await process_bounce.fn(bounce(text, "4.2.2", "full"), bounce_job(f"s{i}"), deps)
        assert out["suppressed"] == ["full@example.net"]  # three soft bounces of one mailbox
        counted = await deps.pool.fetch("SELECT DISTINCT address FROM soft_bounces")
        assert [r["address"] for r in counted] == ["full@example.net"]
        assert await suppressions(deps) == {"gone@example.net", "full@example.net"}
        for i, to in enumerate(["gone@example.net", "Full@Example.NET"]):
            assert (await send_email.fn(mail(to), sending_job(f"j{i}"), deps))["suppressed"]
        assert sink.messages == []


async def test_a_refused_recipient_is_suppressed_in_its_normal_form(deps: Deps):
    async with smtp_sink(refuse_rcpt={"gone@example.net": "550 5.1.1 no such user"}) as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        with pytest.raises(PermanentError, match="550"):
            await send_email.fn(mail("x<Gone@Example.NET>"), sending_job("first"), deps)
        assert await suppressions(deps) == {"gone@example.net"}
        out = await send_email.fn(mail('"gone"@example.net'), sending_job("again"), deps)
        assert out["status"] == "suppressed"
        assert sink.messages == []


async def test_the_envelope_and_the_headers_carry_the_normal_form(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        msg = mail("x<Bob@Example.NET>", cc=['"carol"@example.net'], bcc=["<dave@example.net>"])
        out = await send_email.fn(msg, sending_job("norm"), deps)
        assert out["recipients"] == ["bob@example.net", "carol@example.net", "dave@example.net"]
        (got,) = sink.messages
        assert got.rcpt_tos == ["bob@example.net", "carol@example.net", "dave@example.net"]
        parsed = got.parsed()
        assert (parsed["To"], parsed["Cc"]) == ("bob@example.net", "carol@example.net")
        assert b"dave" not in got.data
        row = await deps.pool.fetchrow("SELECT recipients FROM outbound_messages")
        assert row["recipients"] == out["recipients"]


def test_control_characters_in_addresses_are_refused_by_the_payload():
    for bad in ("vic\x00tim@example.com", "victim@example.com\r\nx", "victim@exam\x7fple.com"):
        body = msgspec.json.encode({"mailbox_id": "mb", "to": [bad], "subject": "s", "text": "t"})
        with pytest.raises(msgspec.ValidationError, match=r"\$\.to\[0\]"):
            msgspec.json.decode(body, type=SendEmail)
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"address": bad}, BounceRecipient)


async def test_a_bad_recipient_fails_the_job_with_a_clear_error(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        await deps.redis.xadd(
            deps.keys.stream("email-sending"),
            {
                "id": "grouped",
                "payload": msgspec.json.encode(mail("friend@example.net", "g:victim@example.com;")),
            },
        )
        async with running(make_engine(deps, ["email-sending"])):
            row = await eventually(lambda: _failed(deps, "grouped"))
    assert row["error"].count("\n") == 0
    assert "invalid recipient" in row["error"]
    assert "is a group" in row["error"]
    assert row["attempts"] == 1
    assert await deps.redis.xlen(deps.keys.dead("email-sending")) == 1
    assert sink.messages == []


async def _failed(deps: Deps, job_id: str) -> Any:
    row = await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    return row if row and row["status"] == "failed" else None


OLD_ROWS = [
    # address as an earlier version stored it, reason, days ago first seen, days ago last seen
    ("victim@example.com", "hard bounce 5.1.1", 3, 2),
    ("<victim@example.com>", "the first, older", 9, 5),
    ('"victim"@example.com', "later", 1, 0),
    ("x<other@example.com>", "complaint", 4, 4),
    ("third@example.com (comment)", "smtp 550", 4, 4),
    ('"a b"@example.com', "needs its quotes", 4, 4),
    ("plain@example.com", "unchanged", 4, 4),
]


async def test_the_migration_brings_old_rows_to_the_normal_form(database: str):
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("CREATE SCHEMA old; SET search_path TO old")
        await conn.execute(CREATE_VERSIONS_SQL)
        migrations = load_migrations()
        mine = next(m for m in migrations if m.name == "normal_form_addresses")
        for m in migrations[: migrations.index(mine)]:
            await conn.execute(m.sql)
            await conn.execute(RECORD_SQL, m.version, m.name)
        await conn.executemany(
            "INSERT INTO suppressions (address, reason, source_job_id, first_seen, last_seen)"
            " VALUES ($1, $2, $2, now() - make_interval(days => $3),"
            " now() - make_interval(days => $4))",
            OLD_ROWS,
        )
        await conn.executemany(
            "INSERT INTO soft_bounces (address, job_id) VALUES ($1, $2)",
            [("<full@example.net>", "j1"), ("full@example.net", "j1"), ('"full"@x.net', "j2")],
        )
        assert mine in await apply_migrations(conn)
        rows = {
            r["address"]: r
            for r in await conn.fetch(
                "SELECT address, reason, first_seen, last_seen,"
                " (now() - first_seen) > interval '8 days' AS old_first,"
                " (now() - last_seen) < interval '1 hour' AS recent_last FROM suppressions"
            )
        }
        soft = await conn.fetch("SELECT address, job_id FROM soft_bounces ORDER BY job_id")
    finally:
        await conn.close()
    assert set(rows) == {normalize_address(a) for a, *_ in OLD_ROWS}
    merged = rows["victim@example.com"]
    assert (merged["reason"], merged["old_first"], merged["recent_last"]) == (
        "the first, older",
        True,
        True,
    )
    assert rows["other@example.com"]["reason"] == "complaint"
    assert rows['"a b"@example.com']["reason"] == "needs its quotes"
    assert [(r["address"], r["job_id"]) for r in soft] == [
        ("full@example.net", "j1"),
        ("full@x.net", "j2"),
    ]

"""The `email-sending` queue against a real SMTP server on loopback."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import msgspec
import pytest

from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.queues.sending import send_email
from jobstream.consumers.store.mailboxes import add_mailbox, parse_relay
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import SendEmail
from jobstream.streams import ConfigError, Job, PermanentError, Policy, RetryableError
from tests.helpers import by_name, eventually, in_memory_spans, running, served

PASSWORD = "s3cret-relay-pw"


def job(job_id: str, attempt: int = 1) -> Job:
    return Job(job_id, "email-sending", attempt, "0-1", int(time.time() * 1000))


def fast(spec: HandlerSpec[Any]) -> HandlerSpec[Any]:
    """The same handler with a quick retry, so tests see the second attempt soon."""
    return dataclasses.replace(spec, policy=Policy(max_attempts=3, backoff_base_s=0.05))


async def job_row(deps: Deps, job_id: str):
    return await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)


async def finished(deps: Deps, job_id: str):
    row = await job_row(deps, job_id)
    return row if row and row["status"] in ("completed", "failed") else None


async def test_sends_one_correct_mime_message_with_auth(deps: Deps, caplog):
    caplog.set_level(logging.DEBUG)
    async with smtp_sink(users={"relay-user": PASSWORD}) as sink:
        await add_mailbox(
            deps.pool,
            "Alice@Example.com",
            mailbox_id="mb-a",
            display_name="Alice Example",
            smtp_url=sink.url("relay-user", PASSWORD),
        )
        msg = SendEmail(
            mailbox_id="mb-a",
            to=["bob@example.net"],
            cc=["carol@example.net"],
            bcc=["dave@example.net"],
            subject="Grüße from the campaign",
            text="plain body",
            html="<p>html body</p>",
            headers={"X-Campaign-Tag": "spring", "In-Reply-To": "<prev@example.net>"},
            campaign_id="cmp-1",
        )
        await deps.publisher.publish("email-sending", msg, "send-1")
        async with running(make_engine(deps, ["email-sending"])):
            row = await eventually(lambda: finished(deps, "send-1"))
    assert row["status"] == "completed", row["error"]
    assert sink.logins == [("relay-user", PASSWORD)]
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.mail_from == "alice@example.com"
    assert sorted(got.rcpt_tos) == ["bob@example.net", "carol@example.net", "dave@example.net"]
    m = got.parsed()
    assert m["From"].addresses[0].display_name == "Alice Example"
    assert m["To"] == "bob@example.net"
    assert m["Cc"] == "carol@example.net"
    assert m["Bcc"] is None
    assert b"dave@" not in got.data
    assert m["Subject"] == "Grüße from the campaign"
    assert m["Date"].datetime.tzinfo is not None
    assert m["X-Campaign-Tag"] == "spring"
    assert m["In-Reply-To"] == "<prev@example.net>"
    message_id = _check_mime(m)

    result = msgspec.json.decode(row["result"])
    assert result["status"] == "sent"
    assert result["message_id"] == message_id
    out = await deps.pool.fetchrow("SELECT * FROM outbound_messages WHERE job_id = 'send-1'")
    assert out["status"] == "sent"
    assert out["message_id"] == message_id
    assert out["campaign_id"] == "cmp-1"
    assert out["sent_at"] is not None
    assert out["smtp_reply"].startswith("250")
    assert sorted(out["recipients"]) == sorted(got.rcpt_tos)
    analytics: Any = await deps.redis.xrange(deps.keys.stream("analytics"))
    assert len(analytics) == 1
    assert b'"type":"sent"' in analytics[0][1][b"payload"]
    assert PASSWORD not in caplog.text
    assert PASSWORD not in row["result"]


def _check_mime(m: Any) -> str:
    """The structure and headers of the campaign message; its Message-ID."""
    assert m.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().strip()) for p in m.iter_parts()]
    assert parts == [("text/plain", "plain body"), ("text/html", "<p>html body</p>")]
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m["List-Unsubscribe"].startswith("<https://")
    assert "mailto:alice@example.com" in m["List-Unsubscribe"]
    message_id = m["Message-ID"].strip("<>")
    assert message_id.endswith("@example.com")
    return str(message_id)


async def test_a_4xx_is_retried_and_the_message_goes_out_exactly_once(deps: Deps):
    async with smtp_sink(data_replies=["451 4.3.0 try again later"]) as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        msg = SendEmail(mailbox_id="mb-a", to=["bob@example.net"], subject="hi", text="t")
        await deps.publisher.publish("email-sending", msg, "send-4xx")
        async with running(make_engine(deps, ["email-sending"], handlers=served(fast(send_email)))):
            row = await eventually(lambda: finished(deps, "send-4xx"))
        assert row["status"] == "completed"
        assert row["attempts"] == 2
        errors = await deps.pool.fetch(
            "SELECT error FROM job_executions WHERE job_id = 'send-4xx' ORDER BY attempt"
        )
        assert "451" in errors[0]["error"]
        assert len(sink.messages) == 1
        # Run the job again (a redelivery after a crash past the commit): nothing is sent.
        again = await send_email.fn(msg, job("send-4xx", 3), deps)
        assert again["duplicate"] is True
        assert again["message_id"] == sink.messages[0].parsed()["Message-ID"].strip("<>")
        assert len(sink.messages) == 1


async def test_a_5xx_recipient_fails_the_job_and_suppresses_the_address(deps: Deps):
    async with smtp_sink(refuse_rcpt={"gone@example.net": "550 5.1.1 no such user"}) as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        msg = SendEmail(mailbox_id="mb-a", to=["Gone@example.net"], subject="hi", text="t")
        await deps.publisher.publish("email-sending", msg, "send-5xx")
        async with running(make_engine(deps, ["email-sending"])):
            row = await eventually(lambda: finished(deps, "send-5xx"))
        assert row["status"] == "failed"
        assert row["attempts"] == 1
        assert "550 5.1.1" in row["error"]
        assert await deps.redis.xlen(deps.keys.dead("email-sending")) == 1
        supp = await deps.pool.fetchrow("SELECT * FROM suppressions")
        assert supp["address"] == "gone@example.net"
        assert supp["reason"].startswith("smtp 550")
        assert supp["source_job_id"] == "send-5xx"
        out = await deps.pool.fetchrow("SELECT status FROM outbound_messages")
        assert out["status"] == "failed"
        # The next message to that address is refused before any SMTP.
        result = await send_email.fn(msg, job("send-after"), deps)
        assert result["status"] == "suppressed"
        assert result["suppressed"] == ["gone@example.net"]
        assert sink.messages == []


async def test_suppressed_recipients_are_left_out_and_all_suppressed_is_not_sent(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        await deps.pool.execute(
            "INSERT INTO suppressions (address, reason) VALUES ('x@example.net', 'complaint')"
        )
        only = SendEmail(mailbox_id="mb-a", to=["X@example.net"], subject="s", text="t")
        assert (await send_email.fn(only, job("j1"), deps))["status"] == "suppressed"
        assert sink.messages == []
        mixed = SendEmail(
            mailbox_id="mb-a", to=["x@example.net"], cc=["y@example.net"], subject="s", text="t"
        )
        result = await send_email.fn(mixed, job("j2"), deps)
        assert result["status"] == "sent"
        assert result["suppressed"] == ["x@example.net"]
        assert [m.rcpt_tos for m in sink.messages] == [["y@example.net"]]


async def test_limits_retry_when_the_window_opens_and_nothing_is_sent(deps: Deps):
    async with smtp_sink() as sink:
        url = sink.url()
        await add_mailbox(
            deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=url, per_minute_limit=2
        )
        await add_mailbox(
            deps.pool, "b@example.com", mailbox_id="mb-b", smtp_url=url, daily_limit=1
        )
        msg = SendEmail(mailbox_id="mb-a", to=["r@example.net"], subject="s", text="t")
        for i in range(2):
            await send_email.fn(msg, job(f"m{i}"), deps)
        with pytest.raises(RetryableError, match="per-minute") as minute:
            await send_email.fn(msg, job("m2"), deps)
        assert 0 < (minute.value.retry_after_s or 0) <= 62
        daily = msgspec.structs.replace(msg, mailbox_id="mb-b")
        await send_email.fn(daily, job("d0"), deps)
        with pytest.raises(RetryableError, match="daily") as day:
            await send_email.fn(daily, job("d1"), deps)
        until_midnight = 86_400 - time.time() % 86_400
        assert until_midnight - 5 <= (day.value.retry_after_s or 0) <= until_midnight + 5
        assert len(sink.messages) == 3
        assert await deps.pool.fetchval("SELECT count(*) FROM outbound_messages") == 3

        # Through the engine: the limited job is waiting for its retry, not failed, not sent.
        await deps.publisher.publish("email-sending", daily, "d2")
        async with running(make_engine(deps, ["email-sending"])):
            await eventually(lambda: _status_is(deps, "d2", "retrying"))
        row = await job_row(deps, "d2")
        assert row["next_attempt_at"].timestamp() >= time.time() + until_midnight - 60
        assert len(sink.messages) == 3


async def _status_is(deps: Deps, job_id: str, status: str) -> bool:
    row = await job_row(deps, job_id)
    return bool(row and row["status"] == status)


async def test_a_refused_relay_failure_in_4xx_is_released_and_retried(deps: Deps):
    """A 4xx at DATA gives the reserved send back: the limit counts messages sent."""
    async with smtp_sink(data_replies=["452 4.3.1 busy"] * 3) as sink:
        await add_mailbox(
            deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url(), per_minute_limit=1
        )
        msg = SendEmail(mailbox_id="mb-a", to=["r@example.net"], subject="s", text="t")
        for attempt in range(1, 4):
            with pytest.raises(RetryableError, match="452"):
                await send_email.fn(msg, job("busy", attempt), deps)
        assert (await send_email.fn(msg, job("busy", 4), deps))["status"] == "sent"
        assert len(sink.messages) == 1


async def test_connection_failure_is_retryable_and_never_shows_the_password(deps: Deps):
    async with smtp_sink() as sink:
        url = sink.url("user", PASSWORD)
    await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=url)
    msg = SendEmail(mailbox_id="mb-a", to=["r@example.net"], subject="s", text="t")
    with pytest.raises(RetryableError) as err:
        await send_email.fn(msg, job("down"), deps)
    assert "unreachable" in str(err.value)
    assert PASSWORD not in str(err.value)
    assert "***" in str(err.value)


async def test_auth_refused_is_permanent_without_credentials_in_the_error(deps: Deps):
    async with smtp_sink(users={"user": "other"}) as sink:
        await add_mailbox(
            deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url("user", PASSWORD)
        )
        msg = SendEmail(mailbox_id="mb-a", to=["r@example.net"], subject="s", text="t")
        with pytest.raises(PermanentError, match="AUTH") as err:
            await send_email.fn(msg, job("auth"), deps)
    assert PASSWORD not in repr(err.value)
    assert sink.messages == []


async def test_html_only_given_message_id_and_bad_headers(deps: Deps):
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        msg = SendEmail(
            mailbox_id="mb-a",
            to=["r@example.net"],
            subject="s",
            html="<b>hi</b>",
            message_id="<given-1@example.com>",
        )
        result = await send_email.fn(msg, job("html"), deps)
        m = sink.messages[0].parsed()
        assert m.get_content_type() == "text/html"
        assert m["Message-ID"] == "<given-1@example.com>"
        assert m["List-Unsubscribe"] is None  # not campaign mail
        assert result["message_id"] == "given-1@example.com"
        for headers in ({"From": "x@evil.test"}, {"X-Bad": "a\r\nBcc: x@evil.test"}):
            with pytest.raises(ValueError, match=r"platform|control"):  # refused by the payload
                msgspec.structs.replace(msg, headers=headers, message_id=None)
            bad = msgspec.structs.replace(msg, message_id=None)
            msgspec.structs.force_setattr(bad, "headers", headers)  # built around that check
            with pytest.raises(PermanentError):
                await send_email.fn(bad, job(f"bad-{len(headers)}-{id(headers)}"), deps)
        assert len(sink.messages) == 1


async def test_unknown_mailbox_is_permanent_and_paused_mailbox_waits(deps: Deps):
    msg = SendEmail(mailbox_id="nope", to=["r@example.net"], subject="s", text="t")
    with pytest.raises(PermanentError, match="no mailbox"):
        await send_email.fn(msg, job("x"), deps)
    await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url="smtp://h:1")
    await deps.pool.execute("UPDATE mailboxes SET status = 'paused'")
    with pytest.raises(RetryableError, match="paused") as err:
        await send_email.fn(msgspec.structs.replace(msg, mailbox_id="mb-a"), job("y"), deps)
    assert (err.value.retry_after_s or 0) > 0


def test_relay_urls():
    plain = parse_relay("smtp://mx.example.com")
    assert (plain.host, plain.port, plain.use_tls, plain.start_tls) == (
        "mx.example.com",
        25,
        False,
        False,
    )
    sub = parse_relay("smtp://u:p%40ss@mx.example.com?starttls")
    assert (sub.port, sub.start_tls, sub.username, sub.password) == (587, True, "u", "p@ss")
    assert "p%40ss" not in sub.shown
    assert "***" in sub.shown
    assert "p@ss" not in repr(sub)
    tls = parse_relay("smtps://u:pw@mx.example.com")
    assert (tls.port, tls.use_tls, tls.start_tls) == (465, True, False)
    with pytest.raises(ConfigError) as err:
        parse_relay("http://u:topsecret@mx.example.com")
    assert "topsecret" not in str(err.value)


async def test_the_smtp_step_is_a_span_without_credentials(deps: Deps):
    async with smtp_sink(users={"relay-user": "other"}) as sink:
        await add_mailbox(
            deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url("relay-user", PASSWORD)
        )
        msg = SendEmail(mailbox_id="mb-a", to=["r@example.net"], subject="s", text="t")
        await deps.publisher.publish("email-sending", msg, "traced")
        with in_memory_spans() as exporter:
            async with running(make_engine(deps, ["email-sending"])):
                await eventually(lambda: finished(deps, "traced"))
            spans = exporter.get_finished_spans()
    (smtp,) = by_name(spans, "smtp send")
    (process,) = [s for s in spans if s.name.startswith("process ")]
    assert smtp.parent is not None
    assert smtp.parent.span_id == process.context.span_id
    assert smtp.attributes is not None
    assert smtp.attributes["server.port"] == sink.port
    assert smtp.status.status_code.name == "ERROR"
    dump = repr([(s.name, s.attributes, [(e.name, e.attributes) for e in s.events]) for s in spans])
    assert "AUTH" in dump
    assert PASSWORD not in dump

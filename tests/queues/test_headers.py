"""Headers are what they claim: producers cannot forge the platform's headers or inject
lines, and the headers the platform writes reach the wire byte for byte as written."""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.parse
from typing import Any

import msgspec
import pytest
from aiosmtplib.email import flatten_message
from hypothesis import given, settings
from hypothesis import strategies as st

from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.mail.mime import build_message
from jobstream.consumers.queues.sending import send_email
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import SendEmail, check_headers
from jobstream.streams import Job
from tests.helpers import eventually, running

LONG_URL = "https://unsubscribe.example.com/one-click/" + "p" * 60 + "/unsubscribe"
LONG_ID = "<" + "r" * 120 + "@threads.example.net>"

# Each refused by the payload (so by the publisher) and, for a payload built around that
# check, by the handler: (headers, words of the reason).
HOSTILE: list[tuple[dict[str, str], str]] = [
    ({"From\t": "boss@evil.test"}, "not a field name"),
    ({"Bcc\t": "spy@evil.test"}, "not a field name"),
    ({" From": "boss@evil.test"}, "not a field name"),
    ({"To ": "spy@evil.test"}, "not a field name"),
    ({"Subject:": "x"}, "not a field name"),
    ({"X-N\x00": "v"}, "not a field name"),
    ({"Naïve": "v"}, "not a field name"),
    ({"": "v"}, "not a field name"),
    ({"bcc": "spy@evil.test"}, "set by the platform"),
    ({"FROM": "boss@evil.test"}, "set by the platform"),
    ({"Sender": "boss@evil.test"}, "set by the platform"),
    ({"Message-Id": "<forged@evil.test>"}, "set by the platform"),
    ({"Content-Disposition": "attachment"}, "set by the platform"),
    ({"content-type": "text/html"}, "set by the platform"),
    ({"Resent-To": "spy@evil.test"}, "set by the platform"),
    ({"List-Unsubscribe": "<https://evil.test/x>"}, "set by the platform"),
    ({"list-unsubscribe-post": "List-Unsubscribe=One-Click"}, "set by the platform"),
    ({"X-Tag": "a", "x-tag": "b"}, "given twice"),
    ({"X-Bad": "a\r\nBcc: spy@evil.test"}, "control character"),
    ({"X-Bad": "a\nb"}, "control character"),
    ({"X-Bad": "a\x00b"}, "control character"),
    ({"X-Bad": "a\x1bb"}, "control character"),
]


def job(job_id: str) -> Job:
    return Job(job_id, "email-sending", 1, "0-1", int(time.time() * 1000))


def mail(**kw: Any) -> dict[str, Any]:
    return {"mailbox_id": "mb-a", "to": ["bob@example.net"], "subject": "s", "text": "t", **kw}


def header_block(data: bytes) -> list[bytes]:
    """The raw header lines as received, folded lines joined (CRLF removed, WSP kept)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    return [re.sub(rb"\r\n(?=[ \t])", b"", h) for h in re.split(rb"\r\n(?![ \t])", head)]


async def test_list_unsubscribe_is_sent_as_written_never_encoded(deps: Deps):
    settings = msgspec.structs.replace(deps.settings, unsubscribe_url=LONG_URL)
    deps = dataclasses.replace(deps, settings=settings)
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "news@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        references = f"<first@threads.example.net>  {LONG_ID}"
        msg = SendEmail(
            **mail(
                campaign_id="spring-2026",
                message_id="<m-1@example.com>",
                headers={"In-Reply-To": LONG_ID, "References": references, "X-Note": "Grüße"},
            )
        )
        await send_email.fn(msg, job("campaign"), deps)
    (got,) = sink.messages
    lines = header_block(got.data)
    assert not any(b"=?" in line for line in lines if not line.startswith(b"X-Note:"))
    query = urllib.parse.urlencode({"m": "m-1@example.com", "c": "spring-2026"})
    unsubscribe = f"List-Unsubscribe: <{LONG_URL}?{query}>,"
    assert f"{unsubscribe} <mailto:news@example.com?subject=unsubscribe>".encode() in lines
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines
    assert f"In-Reply-To: {LONG_ID}".encode() in lines
    assert f"References: {references}".encode() in lines
    # Folded only between URIs and ids: every physical line stays within 998 octets.
    physical = got.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert all(len(line) <= 998 for line in physical)
    first = next(p for p in physical if p.startswith(b"List-Unsubscribe:"))
    assert first == f"{unsubscribe}".encode()  # the https URI on a line of its own
    parsed = got.parsed()
    assert parsed["List-Unsubscribe"] == f"<{LONG_URL}?{query}>, " + (
        "<mailto:news@example.com?subject=unsubscribe>"
    )
    assert parsed["References"] == references
    assert parsed["X-Note"] == "Grüße"  # non-ASCII values are still RFC 2047-encoded


async def test_hostile_headers_never_reach_the_wire(deps: Deps):
    for headers, why in HOSTILE:
        body = msgspec.json.encode(mail(headers=headers))
        with pytest.raises(msgspec.ValidationError, match=why):
            msgspec.json.decode(body, type=SendEmail)
        with pytest.raises(ValueError, match=why):
            SendEmail(**mail(headers=headers))  # the publisher cannot even build it
    for field in ("subject", "message_id"):
        with pytest.raises(msgspec.ValidationError, match=f"{field} holds a control"):
            msgspec.json.decode(msgspec.json.encode(mail(**{field: "a\x00b"})), type=SendEmail)
    async with smtp_sink() as sink:
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a", smtp_url=sink.url())
        stream = deps.keys.stream("email-sending")
        for i, (headers, _) in enumerate(HOSTILE):
            fields = {"id": f"hostile-{i}", "payload": msgspec.json.encode(mail(headers=headers))}
            await deps.redis.xadd(stream, fields)  # type: ignore[arg-type]
        async with running(make_engine(deps, ["email-sending"])):
            rows = await eventually(lambda: _all_failed(deps, len(HOSTILE)))
    assert sink.messages == []
    for row in rows:
        headers, why = HOSTILE[int(row["id"].rpartition("-")[2])]
        assert why in row["error"], (headers, row["error"])
        assert "\n" not in row["error"]
    assert await deps.redis.xlen(deps.keys.dead("email-sending")) == len(HOSTILE)


async def _all_failed(deps: Deps, n: int) -> Any:
    rows = await deps.pool.fetch("SELECT id, status, error FROM jobs WHERE status = 'failed'")
    return rows if len(rows) == n else None


def test_build_message_refuses_what_the_payload_would():
    """A payload built around its checks (force_setattr) is still refused when built."""
    msg = SendEmail(**mail())
    for headers, why in HOSTILE:
        msgspec.structs.force_setattr(msg, "headers", headers)
        with pytest.raises(ValueError, match=why):
            build_message(
                msg,
                address="a@example.com",
                display_name=None,
                message_id="m@x",
                unsubscribe_url="",
            )
    msgspec.structs.force_setattr(msg, "headers", {"X-Long": "w" * 991})
    with pytest.raises(ValueError, match="too long for a line"):
        build_message(
            msg, address="a@example.com", display_name=None, message_id="m@x", unsubscribe_url=""
        )


_NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
_VALUES = st.text(
    st.one_of(st.characters(min_codepoint=32, max_codepoint=126), st.sampled_from(" \t")),
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_check_headers_raises_only_value_error(headers: dict[str, str]):
    try:
        check_headers(headers)
    except ValueError as exc:
        message = str(exc)
    else:
        message = ""
        assert all(re.fullmatch(r"[!-9;-~]+", name) for name in headers)
        assert len({name.lower() for name in headers}) == len(headers)
    assert "\n" not in message  # any refusal is one line


@settings(max_examples=200, deadline=None)
@given(_NAMES.map(lambda n: "X-" + n.replace(":", "")), _VALUES)
def test_an_ascii_value_reaches_the_wire_as_written(name: str, value: str):
    msg = SendEmail(**mail())
    msgspec.structs.force_setattr(msg, "headers", {name: value})
    em = build_message(
        msg, address="a@example.com", display_name=None, message_id="m@x", unsubscribe_url=""
    )
    head = flatten_message(em).split(b"\r\n\r\n", 1)[0]
    physical = head.split(b"\r\n")
    assert all(len(line) <= 998 for line in physical)
    assert f"{name}: {value}".encode() in header_block(flatten_message(em))

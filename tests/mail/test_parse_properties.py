"""Property tests of both mail parsers: any input, bytes or structured MIME, parses cleanly.

`parse_message` and `parse_bounce` document that they never raise; their results must
also cross the parse pool's process boundary (`parseproc.answer`) and be storable.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstream.consumers.mail.dsn import ParsedBounce, parse_bounce
from jobstream.consumers.mail.dsn_text import ADDRESS_RE
from jobstream.consumers.mail.inbound import parse_message
from jobstream.consumers.worker import parseproc
from tests.helpers import assert_sound

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of what real and hostile mail is made of.
LINES = st.sampled_from(
    [
        "",
        " ",
        "<user@example.net>: host mx.example.net said: 550 5.1.1 User unknown",
        "Final-Recipient: rfc822; someone@example.com",
        "Original-Recipient: rfc822;",
        "Action: failed",
        "Action: delayed",
        "Status: 4.2.2",
        "Status: 5.7.1 (blocked using zen.spamhaus.org)",
        "Diagnostic-Code: smtp; 552 mailbox full, quota exceeded",
        "Remote-MTA: dns; mx.example.net.",
        "Message-ID: <orig.1@app.example.org>",
        " > Message-ID: <" + "@" * 40,
        "----- Original message follows -----",
        "not accepting mail from this sender:",
        "\tscreenname",
        "<p>user@example.org: 550 no such user<br>",
        "<<<<<<<<<<<<",
        "exceedexceedexceed quota",
        "=?utf-8?b?w6k=?= =?bogus?q?=E9?=",
        "--b",
        "--b--",
        "\r",
    ]
)
HEADER_NAMES = st.sampled_from(
    [
        "From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Date",
        "Reply-To", "Return-Path", "Auto-Submitted", "Content-Disposition",
        "Content-Transfer-Encoding", "X-Failed-Recipients", "X-Jobstream-Warmup",
    ]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "MAILER-DAEMON@mx.example.org (Mail Delivery System)",
            "Undelivered Mail Returned to Sender",
            "<a@b> <c@d",
            '"a" <b@c>, (nested (comment)) d@',
            "Mon, 32 Foo 99999 25:61:61 +9999",
            "attachment; filename*=utf-8''caf%C3%A9.pdf",
            "base64",
            "quoted-printable",
            "auto-replied",
            "=?utf-8?q?ab?= " * 5,
            "(" * 30,
        ]
    ),
    st.text(max_size=60),
)
CONTENT_TYPES = st.sampled_from(
    [
        "text/plain",
        "text/plain; charset=x-unknown",
        "text/plain; charset=iso-8859-1",
        "text/html",
        "message/delivery-status",
        "message/rfc822",
        "text/rfc822-headers",
        "application/octet-stream; name=x.bin",
        'text/plain; a="unclosed;;;;',
    ]
)
BODY = st.lists(st.one_of(LINES, st.text(max_size=40)), max_size=12).map("\n".join)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)


LEAF = st.tuples(st.just("leaf"), CONTENT_TYPES, HEADERS, BODY)
TREE = st.recursive(
    LEAF,
    lambda children: st.one_of(
        st.tuples(
            st.just("multipart"),
            st.sampled_from(["mixed", "report; report-type=delivery-status", "alternative"]),
            HEADERS,
            st.lists(children, max_size=4),
        ),
        st.tuples(st.just("message"), HEADERS, children),
    ),
    max_leaves=10,
)


def _header_lines(headers: list[tuple[str, str]]) -> str:
    return "".join(f"{name}: {' '.join(value.splitlines())}\n" for name, value in headers)


def render(node: tuple[Any, ...], depth: int = 0) -> str:
    """A MIME tree as text; each multipart level has its own boundary."""
    if node[0] == "leaf":
        _, content_type, headers, body = node
        return f"Content-Type: {content_type}\n{_header_lines(headers)}\n{body}\n"
    if node[0] == "message":
        _, headers, child = node
        return f"Content-Type: message/rfc822\n{_header_lines(headers)}\n{render(child, depth + 1)}"
    _, subtype, headers, children = node
    boundary = f"b{depth}"
    parts = "".join(f"--{boundary}\n{render(c, depth + 1)}" for c in children)
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\n{_header_lines(headers)}'
    return f"{head}\n{parts}--{boundary}--\n"


@st.composite
def messages(draw: Any) -> bytes:
    """A structured message, sometimes cut short or with raw bytes spliced in."""
    text = _header_lines(draw(HEADERS)) + render(draw(TREE))
    raw = text.encode(draw(st.sampled_from(["utf-8", "utf-16-le"])), "surrogatepass")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=16)) + raw[cut:]
    return raw


def assert_bounce_sound(parsed: ParsedBounce) -> None:
    assert isinstance(parsed, ParsedBounce)
    if not parsed.is_bounce:
        assert parsed.recipients == []
    assert len(parsed.recipients) <= 1000
    assert len({r.address for r in parsed.recipients}) == len(parsed.recipients)
    for r in parsed.recipients:
        assert r.address == r.address.lower()
        assert ADDRESS_RE.fullmatch(r.address), r.address
        assert r.kind in ("hard", "soft", "unknown")
        assert r.diagnostic is None or len(r.diagnostic) <= 1000
    mid = parsed.original_message_id
    assert mid is None or (mid.startswith("<") and mid.endswith(">") and "@" in mid)


def assert_crosses_the_pool(parser: str, raw: bytes, expected: msgspec.Struct) -> None:
    """The child's answer carries the same struct (or, for raw 8-bit, a cleaned copy)."""
    data = parseproc.answer(msgspec.msgpack.encode(parseproc.Request(parser, raw)))
    reply = msgspec.msgpack.decode(data, type=parseproc.Reply)
    assert reply.error is None
    result = msgspec.msgpack.decode(reply.result, type=type(expected))
    try:
        msgspec.msgpack.encode(expected)
    except UnicodeEncodeError:  # raw 8-bit bytes left as lone surrogates: sent cleaned
        assert "\ufffd" in msgspec.json.encode(result).decode()
    else:
        assert result == expected


@SETTINGS
@given(st.binary(max_size=3000))
def test_any_bytes_parse_as_inbound_mail(raw: bytes) -> None:
    assert_sound(parse_message(raw))


@SETTINGS
@given(st.binary(max_size=3000))
def test_any_bytes_parse_as_a_bounce(raw: bytes) -> None:
    assert_bounce_sound(parse_bounce(raw))


@SETTINGS
@given(messages())
def test_any_mime_structure_parses_as_inbound_mail(raw: bytes) -> None:
    parsed = parse_message(raw)
    assert_sound(parsed)
    assert all(not i.startswith("<") and not i.endswith(">") for i in parsed.references)
    assert len(parsed.defects) <= 64
    assert_crosses_the_pool("inbound", raw, parsed)


@SETTINGS
@given(messages())
def test_any_mime_structure_parses_as_a_bounce(raw: bytes) -> None:
    parsed = parse_bounce(raw)
    assert_bounce_sound(parsed)
    assert_crosses_the_pool("bounce", raw, parsed)


@SETTINGS
@given(st.lists(st.one_of(LINES, st.text(max_size=80)), max_size=40))
def test_any_notice_text_parses_as_a_bounce(lines: list[str]) -> None:
    head = "From: MAILER-DAEMON@mx.example.org\nSubject: Undeliverable\n\n"
    raw = (head + "\n".join(lines)).encode("utf-8", "surrogatepass")
    assert_bounce_sound(parse_bounce(raw))

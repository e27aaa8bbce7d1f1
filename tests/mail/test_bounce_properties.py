"""The bounce parser on hostile input: it never raises and always answers in shape.

Property-based tests feed it arbitrary bytes, messages assembled from the pieces bounces
are made of, and SES notifications with fields of any type. Crafted inputs of about
1 MB aim at each reader's loops and patterns; they check the answer, not the time, but
a reader that went quadratic on them would not finish within the test timeout.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstream.consumers.mail import dsn_ses, dsn_text
from jobstream.consumers.mail.dsn import ParsedBounce, parse_bounce

_CODE_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}|[45][0-5]\d")
_KINDS = frozenset({"hard", "soft", "unknown"})
_PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _check(parsed: ParsedBounce) -> None:
    """Assert everything a caller may rely on in a parse result."""
    assert isinstance(parsed, ParsedBounce)
    assert parsed.is_bounce or not parsed.recipients
    addresses = [r.address for r in parsed.recipients]
    assert len(addresses) == len(set(addresses)) <= 1000
    for r in parsed.recipients:
        assert r.address == r.address.lower()
        assert dsn_text.ADDRESS_RE.fullmatch(r.address), r
        assert r.kind in _KINDS
        assert r.status is None or _CODE_RE.fullmatch(r.status), r
        assert r.diagnostic is None or 0 < len(r.diagnostic) <= 1000
        assert r.action is None or r.action == r.action.lower()
        assert isinstance(r.sender_side, bool)
    message_id = parsed.original_message_id
    assert message_id is None or (message_id.startswith("<") and message_id.endswith(">"))
    assert msgspec.json.decode(msgspec.json.encode(parsed), type=ParsedBounce) == parsed


@_PROPERTIES
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(raw):
    _check(parse_bounce(raw))


_ADDRESSES = st.one_of(
    st.sampled_from(
        ["bob@example.net", "Carol@Example.ORG", "bob", "x@y", "a.b+c@mx.example.co.jp", "@"]
    ),
    st.builds(
        "{}@{}".format,
        st.text("abcXYZ09._%+-'\"é ", min_size=1, max_size=12),
        st.sampled_from(["example.net", "EXAMPLE.org", "mx.example.co.jp", "x", "-a.b"]),
    ),
)
_PIECES = [
    "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)",
    "From: SES <no-reply@sns.amazonaws.com>",
    "Subject: Undelivered Mail Returned to Sender",
    "Subject: Delivery status notification: warning",
    "To: {a}",
    "X-Failed-Recipients: {a}, {a}",
    'Content-Type: multipart/report; report-type=delivery-status; boundary="b"',
    "Content-Type: text/plain; charset=utf-8",
    "Content-Type: message/delivery-status",
    "Content-Type: message/rfc822",
    "Content-Transfer-Encoding: quoted-printable",
    "--b",
    "--b--",
    "",
    "Final-Recipient: rfc822; {a}",
    "Original-Recipient: rfc822;<{a}>",
    "Action: failed",
    "Action: delayed",
    "Action: delivered",
    "Status: 5.0.0",
    "Status: 4.4.7",
    "Status: 5.1.10",
    "Diagnostic-Code: smtp; 550-5.1.0 then 5.1.1 <{a}>... User unknown",
    "Diagnostic-Code: X-Postfix; 552 4.2.2 mailbox full",
    "Remote-MTA: dns; mx.example.net",
    "<{a}>: host mx.example.net[192.0.2.1] said: 550 5.1.1 unknown",
    "{a}: 421 4.7.0 Try again later",
    "   ----- The following addresses had permanent fatal errors -----",
    "    (expanded from: {a})",
    "554 5.0.0 <{a}>... Service unavailable",
    "  {a}",
    "Recipient: {a}",
    "A message is delayed for more than 4 hours for the following",
    "This is a permanent error. The following address(es) failed:",
    "Message-ID: <{a}>",
    '{{"notificationType":"Bounce","bounce":{{"bounceType":"Transient",'
    '"bouncedRecipients":[{{"emailAddress":"{a}","status":"5.2.2"}}]}}}}',
    '{{"Type":"Notification","Message":"{{\\"eventType\\":\\"Bounce\\"}}"}}',
    "!",
    "=",
    "=3D",
]


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 40))):
        piece = draw(st.one_of(st.sampled_from(_PIECES), st.text(max_size=40)))
        lines.append(piece.replace("{a}", draw(_ADDRESSES)) if "{a}" in piece else piece)
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@_PROPERTIES
@given(_messages())
def test_messages_made_of_bounce_pieces(raw):
    _check(parse_bounce(raw))


_JSON = st.recursive(
    st.none() | st.integers() | st.text(max_size=10) | _ADDRESSES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=5,
)
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "emailAddress": _JSON,
        "status": _JSON,
        "action": _JSON,
        "diagnosticCode": _JSON,
    },
)


@_PROPERTIES
@given(
    kind=st.sampled_from(["Bounce", "bounce", "Complaint", "Delivery", 7, None]),
    bounce_type=st.one_of(st.sampled_from(["Permanent", "Transient", "Undetermined"]), _JSON),
    recipients=st.one_of(st.lists(_FIELDS, max_size=5), _JSON),
    message_id=_JSON,
    wrapped=st.booleans(),
)
def test_ses_notifications_with_fields_of_any_type(
    kind, bounce_type, recipients, message_id, wrapped
):
    notification: dict[str, Any] = {
        "notificationType": kind,
        "bounce": {"bounceType": bounce_type, "bouncedRecipients": recipients},
        "mail": {"commonHeaders": {"messageId": message_id}},
    }
    body = json.dumps(notification)
    if wrapped:
        body = json.dumps({"Type": "Notification", "Message": body})
    raw = f"From: no-reply@sns.amazonaws.com\nSubject: AWS Notification\n\n{body}\n".encode()
    parsed = parse_bounce(raw)
    _check(parsed)
    if kind != "Bounce" and kind != "bounce":
        assert not parsed.recipients


# --- crafted inputs of about 1 MB --------------------------------------------------

_MB = 1_000_000
_HEAD = "From: MAILER-DAEMON@mx.example.org\nTo: app@example.org\nSubject: failure notice\n"


def _report(diagnostic: str) -> bytes:
    return (
        'Content-Type: multipart/report; boundary="b"\n\n--b\n'
        "Content-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.org\n\n"
        "Final-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 5.0.0\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n\n--b--\n"
    ).encode()


def test_crafted_generic_codes_in_a_diagnostic():
    (recipient,) = parse_bounce(_report("5.1.0 " * (_MB // 6) + "5.1.1")).recipients
    assert recipient.status == "5.1.1"
    assert dsn_text.refine_code("5.0.0", "5.0.0 4.1.1 " * (_MB // 12)) == "5.0.0"


def test_crafted_x_failed_recipients_and_local_parts():
    failed = ", ".join(f"user{i}@example.net" for i in range(_MB // 40))
    body = "".join(f"  user{i}\n    550 5.1.1 unknown\n" for i in range(_MB // 60))
    parsed = parse_bounce(f"{_HEAD}X-Failed-Recipients: {failed}\n\n{body}".encode())
    _check(parsed)
    assert len(parsed.recipients) == 1000
    assert parsed.recipients[0].status == "5.1.1"


def test_crafted_lone_recipient_among_lines_without_a_name():
    body = "nothing to see here\n" * (_MB // 40) + "550 5.1.1 gone\n"
    parsed = parse_bounce(f"{_HEAD}X-Failed-Recipients: bob@example.net\n\n{body}".encode())
    assert [(r.address, r.status) for r in parsed.recipients] == [("bob@example.net", None)]


def test_crafted_list_markers_before_an_address():
    line = " \t>*|-" * 10_000 + "550 5.1.1 <bob@example.net>: unknown\n"  # the window keeps 1000
    prose = "write to helpdesk@isp.example.com\n"
    parsed = parse_bounce(f"{_HEAD}\n{prose}{line}".encode() + b"x" * _MB)
    assert [(r.address, r.kind) for r in parsed.recipients] == [("bob@example.net", "hard")]


def test_crafted_ses_notifications():
    recipients = [{"emailAddress": f"u{i}@example.net"} for i in range(_MB // 32)]
    body = json.dumps(
        {
            "notificationType": "Bounce",
            "bounce": {"bounceType": "Permanent", "bouncedRecipients": recipients},
        }
    )
    body = body.replace(", ", "!\n , ")  # line-wrap artefacts everywhere
    parsed = parse_bounce(f"From: no-reply@sns.amazonaws.com\n\n{body}\n".encode())
    assert len(parsed.recipients) == 1000
    assert {r.kind for r in parsed.recipients} == {"hard"}
    nested = '{"notificationType": ' + "[" * (_MB // 2) + "]" * (_MB // 2) + "}"
    assert dsn_ses.read_notice(nested) is None
    assert dsn_ses.read_notice('"notificationType"' + "{" * _MB) is None


def test_crafted_delay_wording():
    assert not dsn_text.is_delay_notice("message is delaye" * (_MB // 17))
    assert dsn_text.is_delay_notice("x" * 60_000 + " message is delayed")


def test_crafted_aol_sentence_without_its_colon():
    body = "they are not accepting mail from x " * (_MB // 35)
    raw = f"From: Mail Delivery Subsystem <MAILER-DAEMON@aol.com>\nSubject: failure\n\n{body}\n"
    parsed = parse_bounce(raw.encode())
    assert (parsed.is_bounce, parsed.recipients) == (True, [])
    notice = "they are not accepting mail from app@example.org:\n\tscreenname\n\nBye\n"
    findings = dsn_text.find_recipients(notice, frozenset(), "aol.com")
    assert [f.address for f in findings] == ["screenname@aol.com"]

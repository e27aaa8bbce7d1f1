"""Amazon SES notifications: JSON in the body, mailed directly or inside an SNS envelope.

The notifications here are hand-written for these tests after the documented SES format
(`notificationType`, `bounce.bounceType`, `bouncedRecipients[]`); real ones are in
`data/bounces_public/ses_sns_*.eml`.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from jobstream.consumers.mail import dsn_ses
from jobstream.consumers.mail.dsn import BouncedRecipient, ParsedBounce, parse_bounce


def _mail(body: str, *, encoding: str = "7bit") -> bytes:
    if encoding == "base64":
        body = base64.encodebytes(body.encode()).decode()
    return (
        "From: SES <no-reply@sns.amazonaws.com>\n"
        "To: bounces@example.org\n"
        "Subject: AWS Notification Message\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        f"Content-Transfer-Encoding: {encoding}\n\n{body}\n"
    ).encode()


def _bounce(bounce_type: str, *recipients: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": list(recipients),
            "reportingMTA": "dsn; a8-12.smtp-out.amazonses.com",
        },
        "mail": {
            "messageId": "0100018e-ses-id",
            "commonHeaders": {"messageId": "<receipt.7@app.example.org>"},
        },
        **extra,
    }


def _parse(notification: dict[str, Any], **kwargs: Any) -> ParsedBounce:
    return parse_bounce(_mail(json.dumps(notification), **kwargs))


def test_permanent_bounce():
    parsed = _parse(
        _bounce(
            "Permanent",
            {
                "emailAddress": "Bob@Example.NET",
                "action": "failed",
                "status": "5.1.1",
                "diagnosticCode": "smtp; 550 5.1.1 user unknown",
            },
        )
    )
    assert parsed == ParsedBounce(
        is_bounce=True,
        recipients=[
            BouncedRecipient(
                address="bob@example.net",
                kind="hard",
                status="5.1.1",
                diagnostic="550 5.1.1 user unknown",
                action="failed",
                remote_mta="a8-12.smtp-out.amazonses.com",
                sender_side=False,
            )
        ],
        original_message_id="<receipt.7@app.example.org>",
    )


def test_transient_bounce_is_soft_whatever_the_action():
    recipient = {"emailAddress": "carol@example.net", "action": "failed", "status": "5.2.2"}
    (found,) = _parse(_bounce("Transient", recipient)).recipients
    assert (found.kind, found.status, found.sender_side) == ("soft", "5.2.2", False)


def test_status_from_the_diagnostic_and_sender_side_policy():
    recipients = (
        {"emailAddress": "dave@example.net", "diagnosticCode": "smtp; 554 5.7.1 blocked"},
        {"emailAddress": "erin@example.net", "status": "5.0.0", "diagnosticCode": "550 5.1.1 no"},
    )
    parsed = _parse(_bounce("Permanent", *recipients))
    got = {r.address: (r.kind, r.status, r.sender_side) for r in parsed.recipients}
    assert got == {
        "dave@example.net": ("hard", "5.7.1", True),
        "erin@example.net": ("hard", "5.1.1", False),
    }


def test_undetermined_bounce_is_classified_by_its_codes():
    recipients = (
        {"emailAddress": "frank@example.net", "status": "4.4.7"},
        {"emailAddress": "grace@example.net", "action": "failed"},
    )
    parsed = _parse(_bounce("Undetermined", *recipients))
    assert {r.address: r.kind for r in parsed.recipients} == {
        "frank@example.net": "soft",
        "grace@example.net": "hard",
    }


def test_sns_envelope_event_publishing_and_base64():
    inner = _bounce("Permanent", {"emailAddress": "heidi@example.net", "status": "5.1.1"})
    inner["eventType"] = inner.pop("notificationType")
    envelope = {"Type": "Notification", "MessageId": "m-1", "Message": json.dumps(inner)}
    body = json.dumps(envelope, indent=2) + "\n\n--\nIf you wish to stop receiving notifications"
    parsed = parse_bounce(_mail(body, encoding="base64"))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("heidi@example.net", "hard", "5.1.1")
    ]
    assert parsed.original_message_id == "<receipt.7@app.example.org>"


def test_line_wrap_artefacts_inside_the_json():
    body = json.dumps(_bounce("Permanent", {"emailAddress": "ivan@example.net"}))
    cut = body.index("ivan") + 2
    wrapped = body[:cut] + "!\n " + body[cut:]  # how a 990-character line limit splits it
    (found,) = parse_bounce(_mail(wrapped)).recipients
    assert found.address == "ivan@example.net"


def test_invalid_and_repeated_addresses_are_skipped():
    recipients = (
        {"emailAddress": "not an address"},
        {"emailAddress": "judy@example.net", "status": "5.1.1"},
        {"emailAddress": "JUDY@example.net", "status": "5.2.2"},
        {"emailAddress": '"Judy T" <trent@example.net>', "status": "5.1.2"},
    )
    parsed = _parse(_bounce("Permanent", *recipients))
    assert [(r.address, r.status) for r in parsed.recipients] == [
        ("judy@example.net", "5.1.1"),
        ("trent@example.net", "5.1.2"),
    ]


@pytest.mark.parametrize(
    "notification",
    [
        {"notificationType": "Complaint", "complaint": {"complainedRecipients": []}},
        {"notificationType": "Delivery", "delivery": {"recipients": ["kim@example.net"]}},
        {"eventType": "Open", "open": {}},
    ],
)
def test_other_notifications_are_not_bounces(notification):
    parsed = _parse(notification)
    assert parsed == ParsedBounce(is_bounce=False, recipients=[], original_message_id=None)


@pytest.mark.parametrize(
    "body",
    [
        '{"notificationType": "Bounce", "bounce": {"bouncedRecipients": [{"emailAddress": 5}]}}',
        '{"notificationType": "Bounce", "bounce": "Permanent"}',
        '{"notificationType": "Bounce", "bounce": {"bounceType": "Permanent"',
        '"notificationType" but no object at all',
        '{"notificationType": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"Type": "Notification", "Message": "{\\"notificationType\\": 7}"}',
    ],
    ids=["wrong-type", "wrong-shape", "truncated", "no-object", "deep", "bad-inner"],
)
def test_malformed_notifications_are_not_read_as_ses(body):
    assert dsn_ses.read_notice(body) is None
    assert parse_bounce(_mail(body)).recipients == []


def test_bounce_without_valid_recipients_is_still_a_bounce():
    parsed = _parse(_bounce("Permanent", {"emailAddress": "nobody"}))
    assert (parsed.is_bounce, parsed.recipients) == (True, [])

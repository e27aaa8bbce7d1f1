"""Bounces whose failed recipient is only in the prose or in `X-Failed-Recipients`.

The messages here are hand-written for these tests, modelled on Postfix, Gmail and Exim
notices without an RFC 3464 report (real ones: `data/bounces_public/postfix_02.eml`,
`gmail_0*.eml`, `exim_01.eml`); every address uses the reserved example domains.
"""

from __future__ import annotations

from jobstream.consumers.mail.dsn import parse_bounce


def _notice(headers: str, body: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\n"
        "To: app@example.org\n" + headers + "\n" + body
    ).encode()


_POSTFIX_BODY = """\
This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please contact <helpdesk@isp.example.com>
or write to abuse-desk@isp.example.com quoting the queue id.

                   The mail system

<bob@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1
    <bob@example.net>: Recipient address rejected: User unknown (in reply to
    RCPT TO command)

<carol@example.net>: host mx.example.net[192.0.2.25] said: 452 4.2.2
    Mailbox full (in reply to RCPT TO command)

--- Undelivered Message ---
From: app@example.org
To: bob@example.net, carol@example.net, cc-me@example.com
Subject: Your receipt
"""


def test_postfix_without_report_ignores_addresses_in_the_prose():
    parsed = parse_bounce(_notice("Subject: Undelivered Mail Returned to Sender\n", _POSTFIX_BODY))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("bob@example.net", "hard", "5.1.1"),
        ("carol@example.net", "hard", "4.2.2"),
    ]


def test_prose_only_recipient_is_still_found():
    body = (
        "Your message to dave@example.net could not be delivered: the remote server\n"
        "answered 550 5.1.1 mailbox unavailable.\n"
    )
    parsed = parse_bounce(_notice("Subject: Undeliverable: Your receipt\n", body))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("dave@example.net", "hard", "5.1.1")
    ]


def test_x_failed_recipients_names_the_recipient_the_prose_does_not():
    headers = (
        "X-Failed-Recipients: erin@example.net\nSubject: Delivery Status Notification (Failure)\n"
    )
    body = (
        "Address not found\n\n"
        "Your message wasn't delivered because the address couldn't be found.\n\n"
        "The response from the remote server was:\n"
        "550 5.1.1 The email account that you tried to reach does not exist.\n"
    )
    parsed = parse_bounce(_notice(headers, body))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("erin@example.net", "hard", "5.1.1")
    ]


def test_x_failed_recipients_and_the_local_part_exim_prints():
    headers = (
        "X-Failed-Recipients: frank@example.net,\n  grace@example.net, not-an-address,\n"
        " Grace@Example.NET\n"
        "Subject: Mail delivery failed: returning message to sender\n"
    )
    body = """\
This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  frank
    SMTP error from remote mail server after RCPT TO:<frank@example.net>:
    550 5.1.1 <frank@example.net>: unknown user
  grace
    SMTP error from remote mail server after end of data:
    552 5.2.2 mailbox over quota
  helpdesk@isp.example.com
"""
    parsed = parse_bounce(_notice(headers, body))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("frank@example.net", "hard", "5.1.1"),
        ("grace@example.net", "hard", "5.2.2"),
    ]


def test_x_failed_recipients_without_any_explanation():
    headers = "X-Failed-Recipients: heidi@example.net\nSubject: failure notice\n"
    parsed = parse_bounce(_notice(headers, "Sorry, it did not work out.\n"))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("heidi@example.net", "hard", None)
    ]


def test_a_listed_recipient_the_prose_does_not_explain_gets_no_one_elses_code():
    headers = (
        "X-Failed-Recipients: ivan@example.net, judy@example.net\n"
        "Subject: Mail delivery failed: returning message to sender\n"
    )
    body = "  ivan@example.net\n    550 5.1.1 unknown user\n"
    parsed = parse_bounce(_notice(headers, body))
    assert [(r.address, r.status) for r in parsed.recipients] == [
        ("ivan@example.net", "5.1.1"),
        ("judy@example.net", None),
    ]

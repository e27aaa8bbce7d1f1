"""Bounces with no usable RFC 3464 report: Sendmail and OpenSMTPD transcripts.

The messages here are hand-written for these tests, modelled on the notices those
servers send (their real counterparts are in `data/bounces_public`); every address uses
the reserved example domains.
"""

from __future__ import annotations

import pytest

from jobstream.consumers.mail.dsn import parse_bounce

_SENDMAIL_HEAD = """\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>
To: {to}
Subject: Returned mail: see transcript for details
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="x1.42/mx.example.org"

This is a MIME-encapsulated message

--x1.42/mx.example.org

The original message was received at Mon, 2 Mar 2026 10:00:00 GMT
from app.example.org [192.0.2.10]

"""

_SENDMAIL_TAIL = """
--x1.42/mx.example.org
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

{block}

--x1.42/mx.example.org
Content-Type: text/rfc822-headers

From: app@example.org
To: {original_to}
Message-Id: <n.1@app.example.org>
Subject: Your receipt

--x1.42/mx.example.org--
"""


def _sendmail(notice: str, block: str, to: str = "app@example.org") -> bytes:
    original_to = "bob@example.net"
    head = _SENDMAIL_HEAD.format(to=to)
    return (head + notice + _SENDMAIL_TAIL.format(block=block, original_to=original_to)).encode()


def test_sendmail_report_without_a_usable_recipient_falls_back_to_the_transcript():
    notice = """\
   ----- The following addresses had permanent fatal errors -----
<bob@example.net>
    (reason: 550 5.1.1 <bob@example.net>... User unknown)

   ----- Transcript of session follows -----
... while talking to mx.example.net.:
>>> RCPT To:<bob@example.net>
<<< 550 5.1.1 <bob@example.net>... User unknown
550 5.1.1 bob@example.net... User unknown
"""
    raw = _sendmail(notice, "Final-Recipient: RFC822; bob\nAction: failed\nStatus: 5.1.1")
    parsed = parse_bounce(raw)
    assert parsed.is_bounce
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("bob@example.net", "hard", "5.1.1")
    ]
    assert parsed.original_message_id == "<n.1@app.example.org>"


def test_sendmail_transient_errors_are_a_delay():
    notice = """\
    **********************************************
    **      THIS IS A WARNING MESSAGE ONLY      **
    **  YOU DO NOT NEED TO RESEND YOUR MESSAGE  **
    **********************************************

   ----- The following addresses had transient non-fatal errors -----
<carol@example.net>
    (reason: 451 4.3.0 Temporary system failure. Please try again later)
"""
    parsed = parse_bounce(_sendmail(notice, "Final-Recipient: RFC822; carol"))
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == [
        ("carol@example.net", "soft", "4.3.0")
    ]


def test_sendmail_postmaster_copy_does_not_report_the_rejected_sender():
    notice = """\
   ----- The following addresses had permanent fatal errors -----
<dave@example.net>
    (reason: 553 5.1.8 <app@example.org>... Domain of sender address does not exist)

   ----- Transcript of session follows -----
... while talking to mx.example.net.:
>>> MAIL From:<app@example.org> SIZE=1200
<<< 553 5.1.8 <app@example.org>... Domain of sender address app@example.org does not exist
501 5.6.0 Data format error
"""
    parsed = parse_bounce(_sendmail(notice, "Final-Recipient: RFC822; dave", to="postmaster"))
    assert [(r.address, r.kind, r.status, r.sender_side) for r in parsed.recipients] == [
        ("dave@example.net", "hard", "5.1.8", True)
    ]


_OPENSMTPD = """\
Subject: Delivery status notification: {what}
From: Mailer Daemon <MAILER-DAEMON@mx.example.org>
To: app@example.org
Date: Mon, 2 Mar 2026 10:00:00 +0000 (UTC)

    Hi!

    This is the MAILER-DAEMON, please DO NOT REPLY to this email.

{body}

    Below is a copy of the original message:

Received: from app.example.org (app.example.org [192.0.2.10]);
\tby mx.example.org (OpenSMTPD) with ESMTP id 8a3c4d2e;
From: app@example.org
To: erin@example.net
Message-Id: <n.2@app.example.org>
Subject: Your receipt

Hello
"""


@pytest.mark.parametrize(
    ("what", "body", "expected"),
    [
        (
            "error",
            "    An error has occurred while attempting to deliver a message for\n"
            "    the following list of recipients:\n\n"
            "erin@example.net: 550 5.1.1 <erin@example.net>: Recipient address rejected\n"
            "frank@example.net: Domain does not exist\n",
            [("erin@example.net", "hard", "5.1.1"), ("frank@example.net", "hard", None)],
        ),
        (
            "warning",
            "    A message is delayed for more than 4 hours for the following\n"
            "    list of recipients:\n\n"
            "erin@example.net: 421 4.7.0 Try again later, closing connection.\n\n"
            "    Please note that this is only a temporary failure report.\n"
            "    The message is kept in the queue for up to 4 days.\n"
            "    You DO NOT NEED to re-send the message to these recipients.\n",
            [("erin@example.net", "soft", "4.7.0")],
        ),
        (
            "error",
            "An error has occurred while attempting to deliver a message.\n\n"
            "Recipient: erin@example.net\n"
            "Reason:\n"
            "550 5.2.1 Mailbox disabled for this recipient\n",
            [("erin@example.net", "hard", "5.2.1")],
        ),
    ],
    ids=["error", "warning", "old-format"],
)
def test_opensmtpd_notice(what, body, expected):
    parsed = parse_bounce(_OPENSMTPD.format(what=what, body=body).encode())
    assert parsed.is_bounce
    assert [(r.address, r.kind, r.status) for r in parsed.recipients] == expected
    assert parsed.original_message_id == "<n.2@app.example.org>"

"""Parse bounces (RFC 3464 reports, SES notifications, other notices) into failed recipients.

Pure: no database, no network, no logging of message content; `parse_bounce` never raises.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterator
from typing import Literal

import msgspec

from jobstream.consumers.mail import dsn_ses, dsn_text, mimetree

__all__ = ["BouncedRecipient", "Kind", "ParsedBounce", "classify_status", "parse_bounce"]

Kind = Literal["hard", "soft", "unknown"]
_Message = email.message.Message

_MAX_RECIPIENTS = 1000
_MAX_DIAGNOSTIC = 1000
_MAX_CLASSIFIED = 4096  # characters of a status or diagnostic classified
_MAX_HEADER_CHARS = 8192  # RFC 2047 decoding rescans a line from each `=?`: quadratic
_FAILED_ACTIONS = frozenset({"failed", "failure", "error", "bounced", "undeliverable"})
_DELAYED_ACTIONS = frozenset({"delayed", "delay", "deferred"})
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})
_CLASS_KIND: dict[str, Kind] = {"5": "hard", "4": "soft"}
_SES_KIND: dict[str, Kind] = {"permanent": "hard", "transient": "soft"}
_RETURNED_TYPES = frozenset(
    {"message/rfc822", "message/rfc822-headers", "text/rfc822-headers", "message/global"}
)
_RECIPIENT_FIELDS = ("Original-Recipient", "Final-Recipient", "X-Actual-Recipient")

_FULL_RE = re.compile(
    r"mailbox (?:is )?full|mail ?folder is full|over ?quota|quota (?:exceeded|violation)"
    r"|\bexceed\w*(?: \w+){0,3} quota|disk quota|insufficient (?:system )?storage"
    r"|mailbox space|too much mail",
    re.IGNORECASE,
)
_TEMPORARY_RE = re.compile(
    r"greylist|graylist|try again later|temporar(?:y|ily)|deferred|delayed|timed? ?out"
    r"|connection refused|too many connections|rate limit",
    re.IGNORECASE,
)
_PERMANENT_RE = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address)|does ?n[o']t exist"
    r"|invalid (?:recipient|mailbox|address|user)|address rejected|mailbox unavailable"
    r"|(?:user|mailbox|recipient) not found|account (?:has been )?(?:disabled|discontinued|closed)"
    r"|no mailbox|not listed|unknown recipient|not recognized|unknown host|host not found"
    r"|addressee unknown|bad destination|no longer valid|not a valid user|unroute?able",
    re.IGNORECASE,
)
_POLICY_RE = re.compile(
    r"(?<![\d.])[45]\.7\.\d{1,3}|\bspam|black ?list|block ?list|\bpolicy\b|\bdmarc\b|\bspf\b"
    r"|\bdkim\b|reputation|\brbl\b|spamhaus|unsolicited|unable to relay|relay(?:ing)? denied",
    re.IGNORECASE,
)
# Linear: the line's indent never spans lines (`^` is tried at every line), and the local
# part holds no `@`, so an id of many `@` has one split to try, not one per `@`.
_MESSAGE_ID_RE = re.compile(r"^(?:[^\S\n]|>)*message-id:\s*(<[^<>\s@]+@[^<>\s]+>)", re.I | re.M)
_FIELD_TYPE_RE = re.compile(r"^\s*[\w.\-]+\s*;\s*")
_SPACE_RE = re.compile(r"\s+")


class BouncedRecipient(msgspec.Struct, frozen=True, kw_only=True):
    """One recipient a bounce reports as failed or delayed."""

    address: str  # lower-cased
    kind: Kind
    status: str | None  # enhanced status code like "5.1.1", else SMTP code like "550"
    diagnostic: str | None  # remote reply or Diagnostic-Code, whitespace-collapsed, <= 1000 chars
    action: str | None  # RFC 3464 Action, lower-cased, when from a report
    remote_mta: str | None
    sender_side: bool = False  # 5.7.x / policy: the sender's problem, not the recipient's


class ParsedBounce(msgspec.Struct, frozen=True, kw_only=True):
    """What a bounce says: whether it is one, who failed, and which message bounced."""

    is_bounce: bool
    recipients: list[BouncedRecipient]
    original_message_id: str | None  # with angle brackets, from the returned headers


_NOT_A_BOUNCE = ParsedBounce(is_bounce=False, recipients=[], original_message_id=None)


def parse_bounce(raw: bytes) -> ParsedBounce:
    """Parse a raw RFC 5322 message into the recipients it reports as bounced.

    An RFC 3464 report (a `message/delivery-status` part) is trusted first; failing
    that, an Amazon SES notification, then the human-readable notice (and its
    `X-Failed-Recipients`) is searched. Never raises: input that cannot be parsed
    yields `is_bounce=False`.
    """
    try:
        return _parse(bytes(raw))
    except Exception:  # safety boundary: hostile or broken input must never fail the caller
        return ParsedBounce(is_bounce=False, recipients=[], original_message_id=None)


def classify_status(
    status: str | None, action: str | None, diagnostic: str | None
) -> tuple[Kind, bool]:
    """Classify one recipient's outcome as (kind, sender_side).

    Precedence: the report's Action (`failed` is hard even with a 4.x.x status,
    `delayed` is soft), then a full mailbox (soft), then the enhanced status class, then
    the SMTP reply class, then known temporary or permanent wording. `sender_side` is
    set for 5.7.x/4.7.x codes, a refused sender address (x.1.7, x.1.8) and policy
    wording (spam, blocklists, DMARC, relaying).
    """
    # What decides is at the start; a producer's megabytes of diagnostic would otherwise
    # cost the event loop a second or more of pattern matching (bounce.py's `_given`).
    status, diagnostic = (
        status and status[:_MAX_CLASSIFIED],
        diagnostic and diagnostic[:_MAX_CLASSIFIED],
    )
    verb = (action or "").strip().lower().split(" ", 1)[0].rstrip(";:,")
    if verb in _SUCCESS_ACTIONS:
        return "unknown", False
    enhanced = dsn_text.enhanced_code(status) or dsn_text.enhanced_code(diagnostic)
    kind = _kind_from_action(verb) or _kind_from_codes(status, enhanced, diagnostic)
    kind = kind or _kind_from_text(diagnostic)
    return kind, _is_sender_side(enhanced, diagnostic)


def _kind_from_action(verb: str) -> Kind | None:
    if verb in _FAILED_ACTIONS:
        return "hard"
    if verb in _DELAYED_ACTIONS:
        return "soft"
    return None


def _kind_from_codes(
    status: str | None, enhanced: str | None, diagnostic: str | None
) -> Kind | None:
    if _is_mailbox_full(enhanced, diagnostic):
        return "soft"
    if enhanced is not None:
        return _CLASS_KIND.get(enhanced[0])
    code = dsn_text.smtp_code(status) or dsn_text.smtp_code(diagnostic)
    return _CLASS_KIND.get(code[0]) if code else None


def _is_mailbox_full(enhanced: str | None, diagnostic: str | None) -> bool:
    """A full mailbox clears by itself: X.2.2, or full/quota wording under a vague code."""
    if enhanced is not None and enhanced[1:] == ".2.2":
        return True
    if enhanced is not None and not enhanced.endswith(".0.0"):
        return False
    return bool(diagnostic and _FULL_RE.search(diagnostic))


def _kind_from_text(diagnostic: str | None) -> Kind:
    if not diagnostic:
        return "unknown"
    if _TEMPORARY_RE.search(diagnostic):
        return "soft"
    return "hard" if _PERMANENT_RE.search(diagnostic) else "unknown"


def _is_sender_side(enhanced: str | None, diagnostic: str | None) -> bool:
    # X.7.x: security or policy; X.1.7 / X.1.8: the sender's address is refused
    if enhanced is not None and (enhanced[1:4] == ".7." or enhanced[1:] in {".1.7", ".1.8"}):
        return True
    return bool(diagnostic and _POLICY_RE.search(diagnostic))


# --- parsing -----------------------------------------------------------------------


def _parse(raw: bytes) -> ParsedBounce:
    # compat32 is the lenient policy: it keeps raw 8-bit bytes and never raises on
    # malformed headers, which the default policy may do on access. Nesting is bounded.
    msg = mimetree.parse_bytes(raw, email.policy.compat32)
    blocks = list(_report_blocks(msg))
    recipients = _dedupe(r for r in map(_recipient_from_block, blocks) if r is not None)
    if any(dsn_text.is_generic(r.status) for r in recipients):
        recipients = _refined_by_notice(msg, recipients)
    ses = None if blocks else _from_ses(msg)
    if ses is not None:
        return ses
    if not recipients:
        sender, subject = _header(msg, "From"), _header(msg, "Subject")
        if not blocks and not dsn_text.looks_like_bounce(sender, subject):
            return ParsedBounce(is_bounce=False, recipients=[], original_message_id=None)
        recipients = _recipients_from_text(msg)
    return ParsedBounce(
        is_bounce=True, recipients=recipients, original_message_id=_original_message_id(msg)
    )


def _report_blocks(msg: _Message) -> Iterator[_Message]:
    """Yield the field blocks of every `message/delivery-status` part.

    The parser already splits such a body into one sub-message per blank-line-separated
    block; a body it left as text is split here the same way.
    """
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            yield from (block for block in payload if isinstance(block, _Message))
        elif isinstance(payload, str):
            parser = email.parser.HeaderParser(policy=email.policy.compat32)
            yield from (parser.parsestr(chunk.strip()) for chunk in re.split(r"\n\s*\n", payload))


def _recipient_from_block(block: _Message) -> BouncedRecipient | None:
    address = next(filter(None, (_address_field(block, name) for name in _RECIPIENT_FIELDS)), None)
    if address is None:
        return None
    action = _field(block, "Action")
    action = action.lower().split(" ", 1)[0] if action else None
    if action in _SUCCESS_ACTIONS:
        return None
    status_field = _field(block, "Status")
    diagnostic = _strip_type(_field(block, "Diagnostic-Code"))
    status = _status(status_field, diagnostic)
    kind, sender_side = classify_status(status, action, diagnostic or status_field)
    return BouncedRecipient(
        address=address,
        kind=kind,
        status=status,
        diagnostic=diagnostic[:_MAX_DIAGNOSTIC] if diagnostic else None,
        action=action,
        remote_mta=_host(_strip_type(_field(block, "Remote-MTA"))),
        sender_side=sender_side,
    )


def _status(status_field: str | None, diagnostic: str | None) -> str | None:
    """Prefer the Status field; take the diagnostic's code when it is more precise."""
    enhanced = dsn_text.enhanced_code(status_field) or dsn_text.enhanced_code(diagnostic)
    enhanced = dsn_text.refine_code(enhanced, diagnostic)
    return enhanced or dsn_text.smtp_code(status_field) or dsn_text.smtp_code(diagnostic)


def _refined_by_notice(msg: _Message, recipients: list[BouncedRecipient]) -> list[BouncedRecipient]:
    """Refine a generic report Status by the code the prose gives the same recipient."""
    text = "\n".join(_notice_texts(msg))
    findings = dsn_text.find_recipients(text, frozenset(_own_addresses(msg)), None)
    windows = {found.address: found.diagnostic for found in findings}
    refined = []
    for r in recipients:
        status = dsn_text.refine_code(r.status, windows.get(r.address))
        if status != r.status:
            kind, sender_side = classify_status(status, r.action, r.diagnostic or status)
            r = msgspec.structs.replace(r, status=status, kind=kind, sender_side=sender_side)
        refined.append(r)
    return refined


def _from_ses(msg: _Message) -> ParsedBounce | None:
    """Read an Amazon SES notification (JSON in the body); None if the message is not one.

    SES's `bounceType` decides the kind: Permanent is hard, Transient soft, whatever
    the recipient's `action` says; an Undetermined bounce is classified by its codes.
    """
    notice = next(filter(None, map(dsn_ses.read_notice, _notice_texts(msg))), None)
    if notice is None or not notice.is_bounce:
        return None if notice is None else _NOT_A_BOUNCE
    recipients = []
    for found in notice.recipients:
        diagnostic = _strip_type(_SPACE_RE.sub(" ", found.diagnostic or "").strip())
        status = _status(found.status, diagnostic)
        action = (found.action or "").strip().lower() or None
        kind, sender_side = classify_status(status, action, diagnostic or status)
        recipients.append(
            BouncedRecipient(
                address=found.address,
                kind=_SES_KIND.get(notice.bounce_type.strip().lower(), kind),
                status=status,
                diagnostic=diagnostic[:_MAX_DIAGNOSTIC] if diagnostic else None,
                action=action,
                remote_mta=_host(_strip_type(notice.reporting_mta)),
                sender_side=sender_side,
            )
        )
    message_id = notice.message_id or _original_message_id(msg)
    return ParsedBounce(
        is_bounce=True, recipients=_dedupe(recipients), original_message_id=message_id
    )


def _recipients_from_text(msg: _Message) -> list[BouncedRecipient]:
    text = "\n".join(_notice_texts(msg))
    exclude = frozenset(_own_addresses(msg))
    action = "delayed" if dsn_text.is_delay_notice(text) else "failed"
    findings = dsn_text.find_recipients(text, exclude, _reporter_domain(msg))
    failed = _failed_recipients(msg)
    if failed:  # the server's own list (Exim, Gmail) beats addresses read from prose
        by_address = {found.address: found for found in findings}
        described = dsn_text.describe(text, failed)
        findings = [by_address.get(found.address, found) for found in described]
    recipients = []
    for found in findings:
        kind, sender_side = classify_status(found.code, action, found.diagnostic)
        recipients.append(
            BouncedRecipient(
                address=found.address,
                kind=kind,
                status=found.code,
                diagnostic=found.diagnostic,
                action=None,
                remote_mta=None,
                sender_side=sender_side,
            )
        )
    return _dedupe(recipients)


def _failed_recipients(msg: _Message) -> list[str]:
    """Return the valid addresses of the X-Failed-Recipients headers, lower-cased."""
    values = [str(value) for value in msg.get_all("X-Failed-Recipients") or []]
    addresses = (address.strip().lower() for _, address in email.utils.getaddresses(values))
    valid = dict.fromkeys(a for a in addresses if dsn_text.ADDRESS_RE.fullmatch(a))
    return list(valid)[:_MAX_RECIPIENTS]


def _notice_texts(msg: _Message) -> list[str]:
    """Return the human-readable parts of the notice, never those of the returned message."""
    plain: list[str] = []
    markup: list[str] = []
    stack = [msg]  # children pushed in reverse, popped from the end: document order
    while stack:
        part = stack.pop()
        if part.get_content_maintype() == "message":
            continue  # the returned original, its headers, or the report itself
        if part.is_multipart():
            stack += reversed([p for p in part.get_payload() if isinstance(p, _Message)])
        elif part.get_content_type() == "text/plain" and not _is_attachment(part):
            plain.append(_part_text(part))
        elif part.get_content_type() == "text/html" and not _is_attachment(part):
            markup.append(dsn_text.html_to_text(_part_text(part)))
    return plain or markup


def _is_attachment(part: _Message) -> bool:
    return str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment")


def _part_text(part: _Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, ValueError):  # unknown or unusable charset label
        return payload.decode("latin-1")


def _original_message_id(msg: _Message) -> str | None:
    """Find the Message-ID of the bounced original in the returned headers or the text."""
    for part in msg.walk():
        if part.get_content_type() not in _RETURNED_TYPES:
            continue
        headers = _returned_headers(part)
        if headers is None or headers.get_content_type() == "multipart/report":
            continue  # a forwarded report: the original is further down
        match = _MESSAGE_ID_RE.search(f"Message-ID: {_header(headers, 'Message-ID')}")
        if match:
            return match.group(1)
    match = _MESSAGE_ID_RE.search("\n".join(_all_texts(msg)))
    return match.group(1) if match else None


def _returned_headers(part: _Message) -> _Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):
        return payload[0] if payload and isinstance(payload[0], _Message) else None
    return email.parser.HeaderParser(policy=email.policy.compat32).parsestr(_part_text(part))


def _all_texts(msg: _Message) -> Iterator[str]:
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            yield _part_text(part)


# --- header helpers ------------------------------------------------------------------


def _header(msg: _Message, name: str) -> str:
    """Return a header decoded from RFC 2047 and whitespace-collapsed, or ''."""
    value = msg.get(name)
    if value is None:
        return ""
    value = str(value)[:_MAX_HEADER_CHARS]
    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        text = value
    return _SPACE_RE.sub(" ", text).strip()


def _field(block: _Message, name: str) -> str | None:
    value = block.get(name)
    text = _SPACE_RE.sub(" ", str(value)).strip() if value is not None else ""
    return text or None


def _strip_type(value: str | None) -> str | None:
    """Drop the `type;` prefix of a DSN field (`smtp; 550 ...`, `dns; mx.example.com`)."""
    if value is None:
        return None
    return _FIELD_TYPE_RE.sub("", value, count=1).strip() or None


def _host(value: str | None) -> str | None:
    """Keep the host name of a Remote-MTA value, without its comment or final dot."""
    return value.split(" ", 1)[0].rstrip(".") or None if value else None


def _address_field(block: _Message, name: str) -> str | None:
    """Return the address of a recipient field (`rfc822; <a@b>`), if it holds a valid one."""
    value = _strip_type(_field(block, name))
    candidate = (value or "").strip().strip("<>").strip().lower()
    return candidate if dsn_text.ADDRESS_RE.fullmatch(candidate) else None


def _own_addresses(msg: _Message) -> Iterator[str]:
    """Yield the notice's own addresses: never failed recipients of the original."""
    names = ("From", "To", "Cc", "Sender", "Return-Path", "Reply-To", "Errors-To")
    values = [_header(msg, name) for name in names]
    for _, address in email.utils.getaddresses(values):
        if address:
            yield address.lower()


def _reporter_domain(msg: _Message) -> str | None:
    """Return the registered-looking domain (last two labels) of the notice's sender."""
    _, address = email.utils.parseaddr(_header(msg, "From"))
    labels = address.rpartition("@")[2].lower().split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 and all(labels[-2:]) else None


def _dedupe(
    recipients: Iterator[BouncedRecipient] | list[BouncedRecipient],
) -> list[BouncedRecipient]:
    """Keep the first report of each address, at most `_MAX_RECIPIENTS` of them."""
    seen: dict[str, BouncedRecipient] = {}
    for recipient in recipients:
        seen.setdefault(recipient.address, recipient)
        if len(seen) >= _MAX_RECIPIENTS:
            break
    return list(seen.values())

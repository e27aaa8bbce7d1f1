"""Parse and classify inbound RFC 5322 messages for the `email:processing` queue.

Pure, no I/O. A malformed message never raises: what can be read is returned, defects listed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from email import policy, utils
from email.message import Message
from typing import Literal, ParamSpec, TypeVar

import msgspec

from jobstream.consumers.mail import mimetree

__all__ = [
    "WARMUP_HEADER",
    "Attachment",
    "Classification",
    "ParsedMessage",
    "classify",
    "parse_message",
]

Classification = Literal["bounce", "auto_reply", "warmup", "reply", "other"]

WARMUP_HEADER = "X-Jobstream-Warmup"
"""Set by the platform on warmup messages; its value is the warmup pair/job reference."""

# Headers copied into `ParsedMessage.headers`: what `classify` reads, plus identity.
_KEPT_HEADERS = (
    *("from", "to", "cc", "reply-to", "return-path", "subject", "date", "message-id"),
    *("in-reply-to", "references", "content-type", "auto-submitted", "x-autoreply"),
    *("x-autorespond", "precedence", "x-auto-response-suppress", "x-failed-recipients"),
    *("list-id", WARMUP_HEADER.lower()),
)

# The header registry's parser is super-linear on long values (a 750 kB header of encoded
# words takes a minute), so longer values bypass it.
_MAX_PARSED_HEADER_CHARS = 16_384
# Its address and MIME-parameter parsers are slower still: tens of microseconds a character,
# growing quadratically past a few kB (16 kB of `(a)` in a To: header takes 10 s).
_MAX_STRUCTURED_CHARS = 4096
_STRUCTURED = frozenset({"from", "to", "cc", "reply-to", "return-path", "content-type"})
_MAX_DEPTH = mimetree.MAX_DEPTH  # multipart / message nesting walked before giving up
_MAX_DEFECTS = 64  # distinct defect strings kept; one hostile message can produce thousands
_MAX_ERROR_CHARS = 200

_P = ParamSpec("_P")
_T = TypeVar("_T")

_ESCAPED_8BIT = re.compile("[\udc80-\udcff]+")  # raw bytes >= 0x80 as surrogateescape left them
_SURROGATE = re.compile("[\ud800-\udfff]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([qQbB])\?([^?\s]*)\?=")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_WHITESPACE = re.compile(r"\s+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATOR = re.compile(rb"\r?\n\r?\n")

_BOUNCE_SUBJECT = re.compile(
    r"\s*(undelivered mail returned to sender|delivery status notification \(failure\)"
    r"|mail delivery failed|undeliverable:|failure notice|returned mail\b)",
    re.IGNORECASE,
)
_BOUNCE_SENDER = re.compile(r"mailer[- ]?daemon|mail delivery (sub)?system", re.IGNORECASE)
_BOUNCE_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
_AUTO_REPLY_SUBJECT = re.compile(
    r"\s*(out of office|automatic reply:|auto:|abwesenheitsnotiz|réponse automatique)",
    re.IGNORECASE,
)
_DELIVERY_REPORT = re.compile(r'report-type\s*=\s*"?delivery-status\b', re.IGNORECASE)


class Attachment(msgspec.Struct, frozen=True, kw_only=True):
    """One attached part; `size` is its decoded length in bytes."""

    filename: str | None
    content_type: str
    size: int


class ParsedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What the queue handler needs from one inbound message; ids carry no angle brackets."""

    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    from_addr: str | None
    from_email: str | None
    to: list[str]
    cc: list[str]
    subject: str | None
    date: datetime | None
    text_body: str | None
    html_body: str | None
    attachments: list[Attachment]
    headers: dict[str, str]
    defects: list[str]


@dataclass
class _Draft:
    """Mutable twin of ParsedMessage, filled step by step so a failing step loses only itself."""

    defects: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    from_addr: str | None = None
    from_email: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    subject: str | None = None
    date: datetime | None = None
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[Attachment] = field(default_factory=list)

    def defect(self, text: str) -> None:
        if text not in self.defects and len(self.defects) < _MAX_DEFECTS:
            self.defects.append(text)

    def freeze(self) -> ParsedMessage:
        return ParsedMessage(**{f.name: getattr(self, f.name) for f in fields(self)})


# --- the safety boundary -----------------------------------------------------------------


def _attempt(
    draft: _Draft, step: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T | None:
    """Run one parsing step; the only place where an unexpected exception is caught.

    The email package's header parser has known crashes on hostile input (an address list
    cut mid-address raises IndexError, deeply nested comments raise RecursionError), so each
    independent step (one header, one MIME part) runs here: a bug costs that step only and
    becomes a "parser error: ..." defect instead of an exception in the handler.
    """
    try:
        return step(*args, **kwargs)
    except Exception as exc:  # deliberate: parse_message must never raise
        draft.defect(_clean(f"parser error: {type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]))
        return None


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw RFC 5322 bytes; never raises, records every defect it meets."""
    draft = _Draft()
    if not raw.strip():
        draft.defect("empty message")
    elif not _SEPARATOR.search(raw) and not raw.startswith((b"\n", b"\r\n")):
        draft.defect("missing header/body separator")
    msg = _attempt(draft, mimetree.parse_bytes, raw, policy.default)
    if msg is not None:
        _read_headers(msg, draft)
        _attempt(draft, _visit, msg, draft, 0, nested=False)
    return draft.freeze()


# --- text decoding -------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Replace lone surrogates, which cannot be encoded to UTF-8 (JSON, Postgres)."""
    return _SURROGATE.sub("\ufffd", text)


def _fallback_decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1", errors="replace")


def _decode(data: bytes, charset: str, prefix: str, draft: _Draft) -> str:
    """Decode with the declared charset, else UTF-8, else Latin-1; record why it fell back."""
    try:
        return _clean(data.decode(charset))
    except LookupError:
        draft.defect(f"{prefix}undecodable charset {_clean(charset[:40])}")
    except ValueError:  # UnicodeDecodeError, or a charset name Python rejects outright
        draft.defect(f"{prefix}invalid {_clean(charset[:40])} bytes")
    return _clean(_fallback_decode(data))


def _defect_name(defect: object) -> str:
    name = type(defect).__name__.removesuffix("Defect")
    if name == "MissingHeaderBodySeparator":
        return "missing header/body separator"
    return _CAMEL.sub(" ", name).lower()


# --- headers -------------------------------------------------------------------------------


def _ew_bytes(encoding: str, text: str) -> bytes:
    if encoding in "bB":
        return base64.b64decode(text + "=" * (-len(text) % 4))
    return binascii.a2b_qp(text, header=True)


def _prepare(name: str, value: str, draft: _Draft) -> str:
    """Turn raw 8-bit bytes into text and re-encode encoded words whose charset is wrong.

    The header registry would turn both into U+FFFD; here they get the body's fallback
    (UTF-8, then Latin-1) and the value stays valid RFC 2047 for the registry to decode.
    """

    def unescape(match: re.Match[str]) -> str:
        draft.defect(f"{name}: 8-bit bytes")
        return _fallback_decode(match.group().encode("ascii", "surrogateescape"))

    def reencode(match: re.Match[str]) -> str:
        charset = match.group(1).partition("*")[0]
        try:
            data = _ew_bytes(match.group(2), match.group(3))
        except ValueError:
            return match.group()  # malformed: leave it to the registry's lenient parser
        try:
            data.decode(charset)
            return match.group()
        except (LookupError, ValueError):
            text = _decode(data, charset, f"{name}: ", draft)
        return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="

    value = "".join(value.splitlines())
    value = _ESCAPED_8BIT.sub(unescape, value)
    return _ENCODED_WORD.sub(reencode, value) if "=?" in value else value


def _registry_text(name: str, value: str, draft: _Draft) -> str:
    header = policy.default.header_factory(name, value)
    for defect in header.defects:
        draft.defect(f"{name}: {_defect_name(defect)}")
    return _clean(str(header))


def _read_headers(msg: Message, draft: _Draft) -> None:
    """Fill the headers dict and every header-derived field, one guarded step per header."""
    raw: dict[str, str] = {}
    for name, value in msg.raw_items():
        raw.setdefault(name.lower(), value)
    for name in _KEPT_HEADERS:
        if name in raw:
            value = _clean(_prepare(name, raw[name], draft))
            shown = _shorten(name, value, draft)
            text = None
            if name in _STRUCTURED and len(shown) > _MAX_STRUCTURED_CHARS:
                draft.defect(f"{name}: longer than {_MAX_STRUCTURED_CHARS} characters, not decoded")
            else:
                text = _attempt(draft, _registry_text, name, shown, draft)
            draft.headers[name] = shown if text is None else text
            _attempt(draft, _use_header, name, value, draft)
    draft.subject = draft.headers.get("subject")
    draft.from_addr = draft.headers.get("from")


def _shorten(name: str, value: str, draft: _Draft) -> str:
    """Cut a value the header registry would take too long on; ids and addresses use it whole."""
    if len(value) <= _MAX_PARSED_HEADER_CHARS:
        return value
    draft.defect(f"{name}: longer than {_MAX_PARSED_HEADER_CHARS} characters, truncated")
    cut = value[:_MAX_PARSED_HEADER_CHARS]
    return cut.rpartition(" ")[0] or cut


def _use_header(name: str, value: str, draft: _Draft) -> None:
    if name == "message-id":
        draft.message_id = next(iter(_ids(value)), None)
    elif name == "in-reply-to":
        draft.in_reply_to = next(iter(_ids(value)), None)
    elif name == "references":
        draft.references = _ids(value)
    elif name == "date":
        draft.date = _date(value, draft)
    elif name == "from":
        draft.from_email = next(iter(_addresses(name, value, draft)), "").lower() or None
    elif name in ("to", "cc"):
        setattr(draft, name, _addresses(name, value, draft))


def _ids(value: str) -> list[str]:
    """Message ids in order, without angle brackets or folding whitespace, deduplicated."""
    found = [_WHITESPACE.sub("", m) for m in _ANGLE_ID.findall(value)]
    if not found and value.strip() and len(value.split()) == 1:
        found = [value.strip()]  # a bare id, as some clients write it
    return list(dict.fromkeys(i for i in found if i))


def _date(value: str, draft: _Draft) -> datetime | None:
    if len(value) > _MAX_PARSED_HEADER_CHARS:
        draft.defect("date: too long")
        return None
    header = policy.default.header_factory("date", value)
    parsed: datetime | None = getattr(header, "datetime", None)
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000": RFC 5322 says UTC, zone unknown
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        draft.defect("date: out of range")
        return None


def _addresses(name: str, value: str, draft: _Draft) -> list[str]:
    """Bare addresses (those with an @) in order; the registry first, else the lenient parser."""
    specs: list[str] | None = None
    if len(value) <= _MAX_STRUCTURED_CHARS:
        specs = _attempt(draft, _registry_addresses, name, value)
    if specs is None:
        specs = [addr for _, addr in utils.getaddresses([value])]
    return [_clean(spec) for spec in specs if "@" in spec]


def _registry_addresses(name: str, value: str) -> list[str]:
    header = policy.default.header_factory(name, value)
    return [address.addr_spec for address in getattr(header, "addresses", ())]


# --- MIME parts ----------------------------------------------------------------------------


def _visit(part: Message, draft: _Draft, depth: int, *, nested: bool) -> None:
    """Walk the MIME tree; inside an attached message only defects are collected."""
    for defect in part.defects:
        draft.defect(_defect_name(defect))
    for name in getattr(part, "cut_headers", ()):
        draft.defect(f"{name}: longer than {mimetree.MAX_MIME_HEADER_CHARS} characters, truncated")
    if depth > _MAX_DEPTH:
        draft.defect(f"MIME nesting deeper than {_MAX_DEPTH} levels: inner parts not read")
        return
    payload = part.get_payload()
    if not isinstance(payload, list):
        if not nested:
            _leaf(part, draft)
        return
    attached = part.get_content_maintype() == "message"
    if attached and not nested:
        draft.attachments.append(_attachment(part, _filename(part, draft), draft))
    for child in payload:
        if isinstance(child, Message):
            _attempt(draft, _visit, child, draft, depth + 1, nested=nested or attached)


def _leaf(part: Message, draft: _Draft) -> None:
    """Take the part as the text or HTML body if it is the first one, else as an attachment."""
    content_type = part.get_content_type()
    maintype = part.get_content_maintype()
    filename = _filename(part, draft)
    is_attachment = part.get_content_disposition() == "attachment" or filename is not None
    if not is_attachment:
        if content_type == "text/html" and draft.html_body is None:
            draft.html_body = _part_text(part, draft)
            return
        # a multipart whose boundary never appears is all text: keep it readable
        if content_type == "text/plain" or maintype == "multipart":
            if draft.text_body is None:
                draft.text_body = _part_text(part, draft)
            return
        if maintype == "text":
            return  # a later inline text part (footer, alternative): not an attachment
    draft.attachments.append(_attachment(part, filename, draft))


def _part_text(part: Message, draft: _Draft) -> str:
    charset = part.get_content_charset() or "us-ascii"
    return _decode(_part_bytes(part), charset, "", draft)


def _part_bytes(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _filename(part: Message, draft: _Draft) -> str | None:
    """The decoded filename (RFC 2231, and RFC 2047 as Outlook writes it), or None."""
    name = part.get_filename()
    if name is None:
        return None
    value = _clean(_prepare("filename", name, draft))
    text = _attempt(draft, _registry_text, "filename", value, draft)
    return value if text is None else text


def _attachment(part: Message, filename: str | None, draft: _Draft) -> Attachment:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/*: the size of the enclosed message(s)
        sizes = [_attempt(draft, _message_size, m) for m in payload if isinstance(m, Message)]
        size = sum(s or 0 for s in sizes)
    else:
        size = len(_part_bytes(part))
    return Attachment(filename=filename, content_type=part.get_content_type(), size=size)


def _message_size(msg: Message) -> int:
    # compat32 writes the headers back as received instead of refolding them
    return len(msg.as_bytes(policy=policy.compat32))


# --- classification ------------------------------------------------------------------------


def classify(
    msg: ParsedMessage, is_platform_message_id: Callable[[Sequence[str]], bool] | set[str]
) -> Classification:
    """Classify in precedence order: bounce, warmup, auto-reply, reply to ours, other.

    `is_platform_message_id` is a set of our Message-IDs (without angle brackets) or a
    callable given the In-Reply-To and References ids that says whether any is ours.
    """
    if _is_bounce(msg):
        return "bounce"
    if WARMUP_HEADER.lower() in msg.headers:
        return "warmup"
    if _is_auto_reply(msg):
        return "auto_reply"
    if _is_reply(msg, is_platform_message_id):
        return "reply"
    return "other"


def _is_bounce(msg: ParsedMessage) -> bool:
    content_type = msg.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() == "multipart/report" and (
        _DELIVERY_REPORT.search(content_type)
    ):
        return True
    if msg.from_email and msg.from_email.partition("@")[0] in _BOUNCE_LOCAL_PARTS:
        return True
    if msg.from_addr and _BOUNCE_SENDER.search(msg.from_addr):
        return True
    return bool(msg.subject and _BOUNCE_SUBJECT.match(msg.subject))


def _is_auto_reply(msg: ParsedMessage) -> bool:
    headers = msg.headers
    auto_submitted = headers.get("auto-submitted", "").partition(";")[0].strip().lower()
    if auto_submitted not in ("", "no"):
        return True
    if "x-autoreply" in headers or "x-autorespond" in headers:
        return True
    if headers.get("precedence", "").strip().lower() == "auto_reply":
        return True
    return bool(msg.subject and _AUTO_REPLY_SUBJECT.match(msg.subject))


def _is_reply(
    msg: ParsedMessage, is_platform_message_id: Callable[[Sequence[str]], bool] | set[str]
) -> bool:
    ids = list(dict.fromkeys(filter(None, [msg.in_reply_to, *msg.references])))
    if not ids:
        return False
    if isinstance(is_platform_message_id, set | frozenset):
        return not is_platform_message_id.isdisjoint(ids)
    return bool(is_platform_message_id(ids))

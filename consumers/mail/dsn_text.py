"""Heuristics for bounces that carry no RFC 3464 report: failed recipients found in the prose.

Pure functions over already-decoded text; email parsing and classification live in `dsn`.
"""

from __future__ import annotations

import bisect
import html
import re
from dataclasses import dataclass

__all__ = [
    "ADDRESS_RE",
    "TextFinding",
    "describe",
    "enhanced_code",
    "find_recipients",
    "html_to_text",
    "is_delay_notice",
    "is_generic",
    "looks_like_bounce",
    "notice_body",
    "refine_code",
    "smtp_code",
]

# Dot-atom local part (RFC 5322) over a conservative character set, so that quotes,
# brackets and `=` around an address in prose are never taken as part of it.
_LOCAL = r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
ADDRESS_RE = re.compile(rf"(?<![\w.%+\-])({_LOCAL}@{_DOMAIN})(?![\w\-])")

_ENHANCED_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
# Only reply codes that SMTP defines for failures; rules out phone numbers and the like.
_SMTP_RE = re.compile(r"(?<![\w.\-+#/])([45][0-5]\d)(?![\w.+/])")

_MAX_TEXT = 64_000
_WINDOW_LINES = 8

# Where the notice ends and the returned message (or its headers) begins.
_CUT_RE = re.compile(
    r"^.*(?:"
    r"original message\s*(?:follows?|details|headers|attached|as received|below|[:\-]|$)"
    r"|mensaje original"
    r"|(?<!receive a )copy of (?:the|your)(?: original)? message"
    r"|returned (?:mail|message)"
    r"|message (?:header|headers|text|body)s? (?:follows?|is following|below)"
    r"|header of the (?:original|source) m"
    r"|unsent message below"
    r"|message reads \(in part\)"
    r"|summary of the undelivered message"
    r"|forwarded message"
    r"|header and top \d+ lines"
    r"|(?:another|alternate|alternative) means|error detail"
    r"|^content-type:\s*(?:message/rfc822|text/rfc822-headers)"
    r"|^>?(?:return-path|received):"
    r").*$",
    re.IGNORECASE | re.MULTILINE,
)

# Lines that quote the original's headers or the SMTP envelope: their addresses are the
# sender's or the original's, not a failed recipient.
_SKIP_LINE_RE = re.compile(
    r"^[\s>*|\-]*(?:from|reply-to|sender|cc|bcc|return-path|errors-to|message-id|"
    r"in-reply-to|references|received|subject|date)\s*:"
    r"|\bmail from\s*:|\bsender ok\b|envelope-from|accepting mail from"
    # help text that shows what an address looks like
    r"|standard form|e\.g\.|for example|for instance",
    re.IGNORECASE,
)
_TO_LINE_RE = re.compile(r"^[\s>*|\-]*to\s*:", re.IGNORECASE)
# What may stand before an address that heads its line: a list item of Postfix, qmail,
# Exim, OpenSMTPD and Gmail, or Sendmail's `550 5.1.1 <bob@example.net>... User unknown`
# and `(expanded from: <bob@example.net>)`.
# Every part is optional, so `match` always succeeds; no quantified group nests another.
_LISTED_RE = re.compile(
    r"[ \t>*|\-]*(?:[245]\d\d[ -])?(?:[245]\.\d{1,3}\.\d{1,3}[ \t]+)?"
    r"(?:\(?expanded from:[ \t]*|(?:failed |original |final )?recipient(?: address)?:[ \t]*)?<?",
    re.IGNORECASE,
)
_ROLE_LOCAL_RE = re.compile(r"^(?:postmaster|mailer[-_]?daemon)$", re.IGNORECASE)

_DELAY_RE = re.compile(
    r"warning (?:message )?only|this is (?:just )?a warning|not yet been delivered"
    r"|will continue to (?:try|attempt)|delivery attempts will continue|will be retried"
    r"|still being retried|has been delayed|been postponed|delivery (?:is |was )?delayed"
    r"|no action is required on your part"
    # OpenSMTPD's warning, Sendmail's list of deferred addresses
    r"|message is delayed|temporary failure report|transient non-fatal error",
    re.IGNORECASE,
)
_BOUNCE_SENDER_RE = re.compile(
    r"mailer[-_]?daemon|postmaster|mail delivery|delivery (?:sub)?system|mdaemon",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|non[- ]?delivery|returned mail|failure notice|failed mail|mail delivery"
    r"|delivery (?:status|failure|failed|report|problem|has failed)|delivery notification"
    r"|not delivered|could not be delivered|delayed mail|message delayed|mail error"
    r"|processing error|mail system error|rejected mail|delivery warning",
    re.IGNORECASE,
)
# AOL lists screen names without a domain, one an indented line, under this sentence.
_AOL_INTRO = "not accepting mail from"
# A tag never holds `<`: a `<` without its `>` is text, not a scan to the end of the input.
_TAG_RE = re.compile(r"<(?:br|p|div|tr|li)\b[^<>]*>|<[^<>]*>", re.IGNORECASE)
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class TextFinding:
    """A recipient named in a notice, with the reply code and text found next to it."""

    address: str
    code: str | None
    diagnostic: str | None


def enhanced_code(text: str | None) -> str | None:
    """Return the first RFC 3463 enhanced status code (like `5.1.1`) in `text`."""
    if not text:
        return None
    match = _ENHANCED_RE.search(text)
    return ".".join(match.groups()) if match else None


def refine_code(code: str | None, text: str | None) -> str | None:
    """Return the most specific enhanced code of `code`'s class in `text`, else `code`.

    A generic code (`x.0.0`, `x.y.0`, the delivery-expired `x.4.7`) says only that
    delivery failed; a remote reply quoted in a diagnostic or the prose often names
    the reason (`5.0.0` with `550 5.1.1 user unknown`). A code of the other class is
    never taken: the class is the report's verdict on the outcome.
    """
    if code is None or not text or not is_generic(code):
        return code
    best = code
    for match in _ENHANCED_RE.finditer(text):
        candidate = ".".join(match.groups())
        if candidate[0] == code[0] and _specificity(candidate) > _specificity(best):
            best = candidate
            if _specificity(best) == 2:
                break
    return best


def is_generic(code: str | None) -> bool:
    """Tell whether `code` is an enhanced code that names no specific reason."""
    return code is not None and code.count(".") == 2 and _specificity(code) < 2


def _specificity(code: str) -> int:
    """0 for `x.0.0`, 1 for `x.y.0` and the delivery-expired `x.4.7`, else 2."""
    _, subject, detail = code.split(".")
    if subject == "0" and detail == "0":
        return 0
    return 1 if detail == "0" or (subject, detail) == ("4", "7") else 2


def smtp_code(text: str | None) -> str | None:
    """Return the first SMTP failure reply code (4xx/5xx) in `text`."""
    if not text:
        return None
    match = _SMTP_RE.search(text)
    return match.group(1) if match else None


def html_to_text(markup: str) -> str:
    """Flatten HTML to text, one line per block element."""

    def repl(match: re.Match[str]) -> str:
        return "\n" if match.group(0)[1:3].lower() in {"br", "p>", "p ", "di", "tr", "li"} else ""

    return html.unescape(_TAG_RE.sub(repl, markup))


def looks_like_bounce(sender: str, subject: str) -> bool:
    """Tell whether the From and Subject headers are those of a delivery notice."""
    return bool(_BOUNCE_SENDER_RE.search(sender) or _BOUNCE_SUBJECT_RE.search(subject))


def is_delay_notice(text: str) -> bool:
    """Tell whether a notice is a warning that delivery is still being retried."""
    return bool(_DELAY_RE.search(notice_body(text)))


def notice_body(text: str) -> str:
    """Cut `text` where the returned message or its quoted headers start."""
    text = text[:_MAX_TEXT].replace("\r\n", "\n")
    match = _CUT_RE.search(text)
    return text[: match.start()] if match else text


def find_recipients(
    text: str, exclude: frozenset[str], reporter_domain: str | None
) -> list[TextFinding]:
    """Find the failed recipients named in a notice, in order of first mention.

    Addresses in quoted header lines, role addresses and those in `exclude` (the
    notice's own From/To and the like, lower-cased) are skipped; a quoted `To:` line is
    used only when nothing else names a recipient. When some addresses head a line of
    their own (the list of failed recipients most servers print), addresses mentioned
    only in running prose (a help desk, a rejected sender) are dropped.
    """
    lines = notice_body(text).split("\n")
    hits = _scan(lines, exclude, with_to=False) or _scan(lines, exclude, with_to=True)
    hits = _prefer_listed(lines, hits)
    if not hits and reporter_domain:
        hits = {name: [0] for name in _aol_names(text, reporter_domain)}
    starts = sorted(mentions[0] for mentions in hits.values())
    findings = []
    for address, mentions in hits.items():
        after = bisect.bisect_right(starts, mentions[0])
        end = starts[after] if after < len(starts) else len(lines)
        window = _window(lines, mentions[0], end)
        code = _code(window) or next(filter(None, (_code(lines[i]) for i in mentions[1:])), None)
        findings.append(TextFinding(address, refine_code(code, window), window))
    return findings


def describe(text: str, addresses: list[str]) -> list[TextFinding]:
    """Return what the notice says of each of `addresses`, recipients known from elsewhere.

    A recipient's explanation starts at the first line naming the address, or naming
    only its local part (Exim lists `bob` for `bob@example.net` when it rewrote the
    address); failing that, for a lone recipient, at the first line that quotes a reply
    code (Gmail names no address next to the remote reply). One pass over the notice,
    however many addresses.
    """
    lines = notice_body(text).split("\n")
    wanted = frozenset(addresses)
    by_local: dict[str, list[str]] = {}
    for address in addresses:
        by_local.setdefault(address.partition("@")[0], []).append(address)
    starts: dict[str, int] = {}
    for index, line in enumerate(lines):
        named = list(by_local.get(line.strip().strip("<>:").lower(), []))
        named += [m.group(1).lower() for m in ADDRESS_RE.finditer(line)]
        for address in named:
            if address in wanted:
                starts.setdefault(address, index)
    if len(addresses) == 1 and not starts:
        coded = next((i for i, line in enumerate(lines) if _code(line)), None)
        starts.update({addresses[0]: coded} if coded is not None else {})
    ends = sorted(starts.values())
    findings = []
    for address in addresses:
        if address not in starts:
            findings.append(TextFinding(address, None, None))
            continue
        after = bisect.bisect_right(ends, starts[address])
        window = _window(lines, starts[address], ends[after] if after < len(ends) else len(lines))
        findings.append(TextFinding(address, refine_code(_code(window), window), window))
    return findings


def _prefer_listed(lines: list[str], hits: dict[str, list[int]]) -> dict[str, list[int]]:
    """Keep the addresses that head a line, if any do; else keep them all."""
    listed = {a: m for a, m in hits.items() if any(_heads(lines[i], a) for i in m)}
    return listed or hits


def _heads(line: str, address: str) -> bool:
    """Tell whether `address` is the first thing on `line` after a list marker or code."""
    prefix = _LISTED_RE.match(line)
    found = ADDRESS_RE.match(line, prefix.end()) if prefix else None
    return found is not None and found.group(1).lower() == address


def _code(text: str | None) -> str | None:
    return enhanced_code(text) or smtp_code(text)


def _window(lines: list[str], start: int, end: int) -> str | None:
    """Join the lines that explain one recipient: up to the next one or a paragraph break."""
    taken = [lines[start]]
    for line in lines[start + 1 : min(end, start + _WINDOW_LINES)]:
        if not line.strip() and len(taken) > 1:
            break
        taken.append(line)
    return _SPACE_RE.sub(" ", " ".join(taken)).strip()[:1000] or None


def _scan(lines: list[str], exclude: frozenset[str], *, with_to: bool) -> dict[str, list[int]]:
    """Map each acceptable address to the lines mentioning it, in order of first mention."""
    seen: dict[str, list[int]] = {}
    for index, line in enumerate(lines):
        if _SKIP_LINE_RE.search(line) or (_TO_LINE_RE.match(line) is not None) != with_to:
            continue
        for match in ADDRESS_RE.finditer(line):
            address = match.group(1).lower()
            local = address.partition("@")[0]
            if address not in exclude and not _ROLE_LOCAL_RE.match(local):
                seen.setdefault(address, []).append(index)
    return seen


def _aol_names(text: str, domain: str) -> list[str]:
    """Return the screen names an AOL notice lists, as addresses in the reporter's domain.

    One pass over the lines: a pattern that searched for the sentence and then for the
    colon ending its line went quadratic on text repeating the sentence without one.
    """
    lines = text[:_MAX_TEXT].replace("\r\n", "\n").split("\n")
    intro = next(
        (i for i, line in enumerate(lines) if _AOL_INTRO in line.lower() and line.endswith(":")),
        None,
    )
    names: list[str] = []
    for line in lines[intro + 1 :] if intro is not None else []:
        if not line[:1].isspace() or not line.strip():
            break
        names.append(line.strip().lower())
    candidates = (f"{name}@{domain}" for name in names if "@" not in name)
    return [address for address in candidates if ADDRESS_RE.fullmatch(address)]

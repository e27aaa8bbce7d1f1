"""Keep secrets out of everything the process shows: logs, spans, errors, command output.

`redact_url` hides a URL's password and its secret-looking query parameters. `scrub` does
that to every URL in a text and also replaces the secret values registered with
`remember_secrets` (the passwords of the configured URLs and of the relays in use), so a
library's error message that quotes a password, or a URL parsed differently than ours,
shows `***` instead.
"""

from __future__ import annotations

import re
import threading
import traceback
import urllib.parse
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "MIN_SECRET_LENGTH",
    "exception_attributes",
    "redact_url",
    "remember_secrets",
    "scrub",
    "secrets_of_url",
]

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are hidden inside URLs but not searched for in free text (too common)."""

_SCHEME_AND_REST = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", re.DOTALL)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "auth", "credential", "apikey", "api_key")
_SECRET_NAMES = frozenset({"key", "sig", "signature", "sslkey"})

_lock = threading.Lock()
_known: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _secret_param(name: str) -> bool:
    name = urllib.parse.unquote_plus(name).strip().lower()
    return name in _SECRET_NAMES or any(w in name for w in _SECRET_WORDS)


class _Parts(NamedTuple):
    scheme: str  # with its "://"
    userinfo: str  # "user:password" or "user", without the "@"; "" when none
    at: str  # "@" when there is a userinfo
    host: str  # host[:port]
    path: str
    query: str | None  # without its "?"; None when there is none
    fragment: str  # with its "#", or ""


def _split(url: str) -> _Parts | None:
    """A URL cut into its parts, text kept exactly as written.

    The authority ends at the first `/`, `?` or `#` and the userinfo at the *last* `@`
    before it, as RFC 3986 and `urllib.parse` read it, so a raw `@` or `:` in a password
    stays inside the userinfo.
    """
    m = _SCHEME_AND_REST.fullmatch(url)
    if m is None:
        return None
    rest = m[2]
    end = min([i for i in (rest.find(c) for c in "/?#") if i != -1], default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    before, hash_, fragment = rest[end:].partition("#")
    path, q, query = before.partition("?")
    return _Parts(m[1], userinfo, at, host, path, query if q else None, hash_ + fragment)


def _password(userinfo: str) -> str | None:
    _, colon, password = userinfo.partition(":")
    return password if colon else None


def redact_url(url: str | None) -> str | None:
    """The URL with its password and secret query parameters (`password=`, `token=`,
    `sslpassword=`, ...) replaced by `***`; the rest exactly as given."""
    if url is None:
        return None
    p = _split(url)
    if p is None:
        return url
    userinfo = p.userinfo
    if _password(userinfo) is not None:
        userinfo = f"{userinfo.partition(':')[0]}:{MASK}"
    query = ""
    if p.query is not None:
        pairs = []
        for pair in re.split(r"([&;])", p.query):
            name, eq, _ = pair.partition("=")
            pairs.append(f"{name}={MASK}" if eq and _secret_param(name) else pair)
        query = "?" + "".join(pairs)
    return f"{p.scheme}{userinfo}{p.at}{p.host}{p.path}{query}{p.fragment}"


def secrets_of_url(url: str | None) -> list[str]:
    """The secret values a URL carries: its password and secret query parameters, each as
    written and decoded."""
    p = _split(url) if url else None
    if p is None:
        return []
    raw = [_password(p.userinfo) or ""]
    for pair in re.split(r"[&;]", p.query or ""):
        name, eq, value = pair.partition("=")
        if eq and _secret_param(name):
            raw.append(value)
    out: list[str] = []
    for value in raw:
        out += [value, urllib.parse.unquote(value), urllib.parse.unquote_plus(value)]
    return [v for v in dict.fromkeys(out) if v]


def remember_secrets(values: Iterable[str | None]) -> None:
    """Register secret values for `scrub` to hide from now on (this process, every thread).

    Each is hidden as given and percent-encoded; values shorter than `MIN_SECRET_LENGTH`
    are hidden only inside URLs.
    """
    global _pattern
    forms: set[str] = set()
    for value in values:
        if not value or len(value) < MIN_SECRET_LENGTH:
            continue
        forms |= {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
        forms.add(urllib.parse.quote(value, safe="/:"))
    with _lock:
        if forms <= _known:
            return
        _known.update(forms)
        ordered = sorted(_known, key=len, reverse=True)  # longest first: no partial masking
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def scrub(text: str) -> str:
    """`text` with every URL redacted and every remembered secret replaced by `***`."""
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m[0]) or "", text)
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return text


def exception_attributes(exc: BaseException) -> dict[str, str]:
    """`exception.message` and `exception.stacktrace` for `Span.record_exception`, scrubbed
    (the SDK would record `str(exc)` and the traceback as they are)."""
    return {
        "exception.message": scrub(str(exc)),
        "exception.stacktrace": scrub("".join(traceback.format_exception(exc))),
    }

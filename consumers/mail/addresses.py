"""Email addresses: the one normal form in which the platform sends, suppresses and records.

Pure, no I/O. Every address that reaches an SMTP envelope, a suppression or a bounce row
goes through `normalize_address`, so no spelling of a mailbox can slip past its suppression.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import Sequence
from email.errors import NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from functools import lru_cache

import idna

__all__ = ["MAX_ADDRESS_CHARS", "AddressError", "normalize_address", "normalize_each"]

MAX_ADDRESS_CHARS = 320
"""Longest accepted input, display name included (RFC 5321 allows 64 + 1 + 255 for the address)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A dot-atom local part at a dot-atom ASCII domain: the parser would return it unchanged
# but for case, so these skip it (it costs about 0.4 ms an address). A test checks that
# both paths agree.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
# Defects that leave exactly one well-formed mailbox: an obsolete route or spacing, and an
# SMTPUTF8 local part. Any other defect means the parser had to guess.
_TOLERATED = (ObsoleteHeaderDefect, NonASCIILocalPartDefect)
_REGISTRY = HeaderRegistry()
_INLINE = 8  # slow-path addresses normalised on the event loop; more go to a thread


class AddressError(ValueError):
    """The text is not exactly one usable mailbox address; the message says why."""


def normalize_address(text: str) -> str:
    """Return `local@domain`, the normal form of the one mailbox `text` names.

    Display names, comments, angle brackets, an obsolete route and quotes a local part does
    not need are dropped; the local part and the domain are lower-cased, and an
    internationalised domain is IDNA-encoded (UTS #46, so `BÜCHER.example` and
    `xn--bcher-kva.example` are the same). Idempotent. Raises AddressError, and nothing
    else, for several addresses, a group, a control character (CR, LF, NUL ...), no local
    part or no domain, more than `MAX_ADDRESS_CHARS` characters, or anything the parser
    cannot read as exactly one mailbox.
    """
    if len(text) > MAX_ADDRESS_CHARS:
        raise AddressError(f"address {text[:40]!r}... is longer than {MAX_ADDRESS_CHARS}")
    if _CONTROL.search(text):
        raise AddressError(f"address {text!r} contains a control character")
    if _SIMPLE.fullmatch(text):
        return text.lower()
    found = _parsed(text)
    if isinstance(found, AddressError):
        raise AddressError(str(found))  # a new one: a cached exception would grow its traceback
    return found


async def normalize_each(texts: Sequence[str]) -> list[str | AddressError]:
    """Normalise each address: its normal form, or the AddressError that refuses it.

    Simple addresses are done inline; when more than a few need the full parser, the whole
    list is normalised in a worker thread so a crafted list never holds the event loop.
    """
    slow = sum(1 for t in texts if not _SIMPLE.fullmatch(t))
    if slow <= _INLINE:
        return _each(texts)
    return await asyncio.to_thread(_each, texts)


def _each(texts: Sequence[str]) -> list[str | AddressError]:
    out: list[str | AddressError] = []
    for text in texts:
        try:
            out.append(normalize_address(text))
        except AddressError as exc:
            out.append(exc)
    return out


@lru_cache(maxsize=4096)
def _parsed(text: str) -> str | AddressError:
    """The normal form, or the refusal: both cached, so a repeated crafted address costs
    the parser once (it takes up to ~15 ms for 320 characters)."""
    try:
        return _normal(text)
    except AddressError as exc:
        return exc


def _normal(text: str) -> str:
    found = _mailbox(text)
    addr_spec = Address(username=found.username.lower(), domain=_domain(text, found.domain))
    normal = addr_spec.addr_spec
    # The SMTP client re-parses each recipient with email.utils.parseaddr: refuse a form
    # that parser would read as another mailbox than the one suppressions were checked for.
    if email.utils.parseaddr(normal)[1] != normal:
        raise AddressError(f"address {text!r} cannot be sent unambiguously")
    return normal


def _mailbox(text: str) -> Address:
    """The one mailbox `text` names, as the standard library's header parser reads it."""
    try:
        header = _REGISTRY("To", text)
    except Exception:  # parser boundary: the stdlib parser raises IndexError, RecursionError ...
        raise AddressError(f"address {text!r} is not a valid address") from None
    assert isinstance(header, AddressHeader)  # "To" is an address header in the registry
    if len(header.addresses) != 1:
        what = "no address" if not header.addresses else "several addresses"
        raise AddressError(f"address {text!r} holds {what}: give exactly one")
    if header.groups[0].display_name is not None:
        raise AddressError(f"address {text!r} is a group: give exactly one address")
    found = header.addresses[0]
    if found.username and not found.domain:
        raise AddressError(f"address {text!r} has no domain")
    if found.domain and not found.username:
        raise AddressError(f"address {text!r} has no local part")
    if not found.domain or any(not isinstance(d, _TOLERATED) for d in header.defects):
        raise AddressError(f"address {text!r} is not a valid address")
    return found


def _domain(text: str, domain: str) -> str:
    """The domain lower-cased, as A-labels when it is internationalised; a literal as is."""
    if domain.startswith("["):
        return domain.lower()
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise AddressError(f"address {text!r} has an invalid domain") from None
    domain = domain.lower()
    if "" in domain.split("."):
        raise AddressError(f"address {text!r} has an invalid domain")
    return domain

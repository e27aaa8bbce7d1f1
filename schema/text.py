"""Text at the edges: what Redis replies as text, and text PostgreSQL can store.

Pure functions; the one home of each (engine and application alike use them).
"""

from __future__ import annotations

import re

__all__ = ["as_text", "clean_text"]

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates


def as_text(value: object, errors: str = "replace") -> str:
    """A Redis reply or field as `str`: bytes decoded as UTF-8, bad bytes replaced (or,
    with `errors="strict"`, UnicodeDecodeError)."""
    if isinstance(value, bytes):
        return value.decode(errors=errors)
    return value if isinstance(value, str) else str(value)


def clean_text(text: str | None) -> str | None:
    """Replace what PostgreSQL text and jsonb refuse: NUL, and lone surrogates (not UTF-8)."""
    return _UNSTORABLE.sub("\ufffd", text) if text else text

"""Times on the wire: ISO-8601 UTC with milliseconds, and the time in a stream entry ID.

The one home of each format (DESIGN.md: times are ms since epoch or ISO-8601 UTC).
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["entry_ms", "entry_parts", "utc_iso"]


_SECOND: list[Any] = [None, ""]  # the last whole second formatted, and its text


def utc_iso(seconds: float) -> str:
    """`2026-12-03T14:06:54.123Z` for epoch `seconds`: every timestamp we write looks so.

    Cheap on the hot path: a whole second is formatted once.
    """
    whole = math.floor(seconds)
    if whole != _SECOND[0]:
        _SECOND[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_SECOND[1]}.{min(int((seconds - whole) * 1000), 999):03d}Z"


def entry_ms(entry_id: str) -> int:
    """The milliseconds part of a stream entry ID `<ms>-<seq>`; ValueError if not digits."""
    ms = entry_id.partition("-")[0]
    if not (ms.isascii() and ms.isdigit()):
        raise ValueError(f"not a stream entry ID: {entry_id[:40]!r}")
    return int(ms)


def entry_parts(entry_id: str) -> tuple[int, int]:
    """(milliseconds, sequence) of a stream entry ID, in stream order; ValueError if not one."""
    seq = entry_id.partition("-")[2] or "0"
    if not (seq.isascii() and seq.isdigit()):
        raise ValueError(f"not a stream entry ID: {entry_id[:40]!r}")
    return entry_ms(entry_id), int(seq)

"""Suppressed addresses: the one statement that adds one and the one that looks them up.

Every writer (hard bounces, soft-bounce limits, SMTP 5xx refusals) and every reader
(sending) goes through here, always with the normal form of `jobstream.consumers.mail.addresses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from jobstream.consumers.mail.addresses import normalize_address

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

__all__ = ["SUPPRESSED_SQL", "SUPPRESS_SQL", "suppress", "suppressed"]

# first_seen, reason and source job stay those of the first suppression; last_seen moves.
SUPPRESS_SQL = """
INSERT INTO suppressions AS s (address, reason, source_job_id)
VALUES ($1, $2, $3)
ON CONFLICT (address) DO UPDATE SET last_seen = now()
"""
SUPPRESSED_SQL = "SELECT address FROM suppressions WHERE address = ANY($1::text[])"
_MAX_REASON_CHARS = 300


async def suppress(conn: Conn, address: str, reason: str, job_id: str | None) -> str:
    """Suppress the address (its normal form, which is returned); a repeat only moves
    `last_seen`. Raises AddressError when `address` is not one usable address."""
    normal = normalize_address(address)
    await conn.execute(SUPPRESS_SQL, normal, reason[:_MAX_REASON_CHARS], job_id)
    return normal


async def suppressed(conn: Conn, addresses: Sequence[str]) -> set[str]:
    """The normal forms of those of `addresses` that are suppressed. Raises AddressError
    like `normalize_address` (which is idempotent: give normal forms, get them back)."""
    rows = await conn.fetch(SUPPRESSED_SQL, [normalize_address(a) for a in addresses])
    return {r["address"] for r in rows}

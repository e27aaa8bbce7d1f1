"""Per-mailbox send limits shared by every replica: fixed-window counters in Redis.

Both counters of a mailbox carry the mailbox as their hash tag, so one script moves them.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

from jobstream.streams import Keys
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Slot", "release", "reserve"]

# KEYS: minute counter, day counter. ARGV: per-minute limit, daily limit (0: none), TTLs (ms).
# Returns 0 and counts the send, or 1 (minute full) / 2 (day full) and counts nothing.
RESERVE_LUA = """
local per_day = tonumber(ARGV[2])
if per_day > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= per_day then return 2 end
local per_minute = tonumber(ARGV[1])
if per_minute > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= per_minute then
  return 1
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""
# Give a reserved send back (the message did not go out); never below zero.
RELEASE_LUA = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
return 0
"""
_MINUTE_TTL_MS = 120_000
_DAY_TTL_MS = 2 * 86_400_000


@dataclass(frozen=True, slots=True)
class Slot:
    """A reserved send: the counters it was taken from, or why none was free."""

    keys: tuple[str, str]
    refused: str | None = None
    """`per-minute` or `daily` when the limit is reached; None when the send may go."""
    retry_after_s: float = 0.0
    """Seconds until the full window opens again (with a little jitter)."""


def _tag(mailbox_id: str) -> str:
    if any(c in mailbox_id for c in "{}"):
        return hashlib.sha1(mailbox_id.encode()).hexdigest()
    return mailbox_id


def counter_keys(keys: Keys, mailbox_id: str, now: float) -> tuple[str, str]:
    """The mailbox's counters for the minute and the UTC day containing `now`."""
    base = f"{keys.prefix}sendlimit:{{mbx:{_tag(mailbox_id)}}}"
    return f"{base}:m:{int(now // 60)}", f"{base}:d:{int(now // 86_400)}"


async def reserve(
    redis: AnyRedis,
    keys: Keys,
    mailbox_id: str,
    per_minute: int,
    daily: int,
    now: float | None = None,
) -> Slot:
    """Count one send against the mailbox's limits, or say which window is full and for how long.

    A limit of 0 means no limit. Atomic across replicas: two workers never both take the
    last slot of a window.
    """
    t = time.time() if now is None else now
    pair = counter_keys(keys, mailbox_id, t)
    script = redis.register_script(RESERVE_LUA)
    code = int(await script(keys=list(pair), args=[per_minute, daily, _MINUTE_TTL_MS, _DAY_TTL_MS]))
    if code == 0:
        return Slot(pair)
    window = 60 if code == 1 else 86_400
    wait = window - (t % window) + random.uniform(0, 2)  # jitter: not all at the same instant
    return Slot(pair, "per-minute" if code == 1 else "daily", wait)


async def release(redis: AnyRedis, slot: Slot) -> None:
    """Give the reserved send back after the message was not sent."""
    if slot.refused is None:
        await redis.register_script(RELEASE_LUA)(keys=list(slot.keys))

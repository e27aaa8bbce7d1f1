"""The heartbeat's value: a small JSON object under `alive:<consumer>`.

Its expiry (`alive_ttl_ms`) is what proves a consumer alive: the reclaimer and `health`
only ask whether the key exists. The value tells operators when it was written, by which
process, and how many jobs that process was running then.
"""

from __future__ import annotations

import msgspec

__all__ = ["Heartbeat", "heartbeat_value", "read_heartbeat"]


class Heartbeat(msgspec.Struct, frozen=True):
    at: float
    pid: int = 0
    host: str = ""
    queues: list[str] = msgspec.field(default_factory=list)
    in_flight: int = 0


def heartbeat_value(*, at: float, pid: int, host: str, queues: list[str], in_flight: int) -> bytes:
    return msgspec.json.encode(Heartbeat(at, pid, host, queues, in_flight))


def read_heartbeat(raw: bytes | str | None) -> Heartbeat | None:
    """The heartbeat, or None for no key; a bare number (older workers wrote the time alone)
    is read as its time; anything else as a heartbeat of unknown age (time 0)."""
    if raw is None:
        return None
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        return msgspec.json.decode(data, type=Heartbeat)
    except msgspec.DecodeError:  # not a heartbeat object: an older worker's bare time?
        return _bare_time(data)


def _bare_time(data: bytes) -> Heartbeat:
    try:
        return Heartbeat(at=float(data))
    except ValueError:
        return Heartbeat(at=0.0)

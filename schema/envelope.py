"""The stream envelope: an entry's flat string fields decoded into a typed record.

Knows the producer wire format (see the README) and nothing of any queue's payload.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "MAX_ATTEMPT",
    "MAX_ID_LENGTH",
    "MAX_TIME_MS",
    "Envelope",
    "EnvelopeError",
    "decode_envelope",
    "enqueued_at_ms",
    "safe_job_id",
]

MAX_ID_LENGTH = 200
MAX_ATTEMPT = 1_000_000
# 9999-12-31T23:59:59.999Z: the latest time both PostgreSQL and Python's datetime hold.
MAX_TIME_MS = 253_402_300_799_999
_KNOWN = frozenset({b"payload", b"id", b"attempt", b"traceparent", b"tracestate"})


class EnvelopeError(ValueError):
    """The entry's fields break the wire format; the message says which field and why."""


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One decoded entry: routing and tracing fields, the raw payload, the rest kept."""

    entry_id: str
    job_id: str
    attempt: int
    payload: bytes
    traceparent: str | None = None
    tracestate: str | None = None
    extra: dict[str, str] = msgspec.field(default_factory=dict)


def enqueued_at_ms(entry_id: str) -> int:
    """The enqueue time: the millisecond part of a stream ID, clamped to `MAX_TIME_MS`.

    A producer may `XADD` an explicit ID (up to `18446744073709551615-0`) that is no time
    any store can hold; such an entry, and every `*` entry after it in the same stream,
    is recorded as enqueued at `MAX_TIME_MS` rather than refused.
    """
    ms = entry_id.partition("-")[0]
    if not (ms.isascii() and ms.isdigit()):
        return 0
    return MAX_TIME_MS if len(ms) > 15 else min(int(ms), MAX_TIME_MS)


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise EnvelopeError(f"field {name!r} is not valid UTF-8") from None


def decode_envelope(entry_id: str, fields: dict[bytes, bytes]) -> Envelope:
    """Decode an entry's fields; raise EnvelopeError naming what is wrong.

    The job id defaults to the entry ID; unknown fields are kept in `extra`.
    """
    payload = fields.get(b"payload")
    raw_id = fields.get(b"id")
    job_id = entry_id if raw_id is None or raw_id == b"" else _text(raw_id, "id")
    if len(job_id) > MAX_ID_LENGTH:
        raise EnvelopeError(f"field 'id' is {len(job_id)} characters, at most 200 allowed")
    if "\x00" in job_id:
        raise EnvelopeError("field 'id' contains a NUL character")
    if payload is None:
        raise EnvelopeError("field 'payload' is missing")
    raw_attempt = fields.get(b"attempt")
    attempt = 1
    if raw_attempt is not None:
        try:
            attempt = int(raw_attempt)
        except ValueError:
            raise EnvelopeError("field 'attempt' is not an integer") from None
        if attempt < 1:
            raise EnvelopeError("field 'attempt' must be at least 1")
        if attempt > MAX_ATTEMPT:
            raise EnvelopeError(f"field 'attempt' is {attempt}, at most {MAX_ATTEMPT} allowed")
    tp = fields.get(b"traceparent")
    ts = fields.get(b"tracestate")
    extra = (
        {}
        if _KNOWN.issuperset(fields)
        else {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in fields.items()
            if k not in _KNOWN
        }
    )
    return Envelope(
        entry_id=entry_id,
        job_id=job_id,
        attempt=attempt,
        payload=payload,
        traceparent=tp.decode(errors="replace") if tp else None,
        tracestate=ts.decode(errors="replace") if ts else None,
        extra=extra,
    )


def safe_job_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The job id to record an invalid entry under: its `id` if usable, else the entry ID."""
    raw = fields.get(b"id")
    if raw:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return entry_id
        if len(text) <= MAX_ID_LENGTH and "\x00" not in text:
            return text
    return entry_id

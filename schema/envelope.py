"""The stream envelope: an entry's flat string fields decoded into a typed record.

Knows the producer wire format (see the README) and nothing of any queue's payload.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "MAX_ATTEMPT",
    "MAX_ID_LENGTH",
    "EntryFields",
    "Envelope",
    "EnvelopeError",
    "decode_envelope",
    "enqueued_at_ms",
    "safe_job_id",
]

MAX_ID_LENGTH = 200
MAX_ATTEMPT = 1_000_000
_KNOWN = frozenset({b"payload", b"id", b"attempt", b"traceparent", b"tracestate"})


class EntryFields(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """The fields of a stream entry (XADD) or of a delayed-set member, all strings.

    Other fields are kept (dead letters carry them) and otherwise ignored.
    """

    # The source of schema/jsonschema/envelope.json; `decode_envelope` accepts all it allows.

    payload: Annotated[
        str,
        msgspec.Meta(
            description="A JSON object matching the queue's payload schema.",
            extra_json_schema={"contentMediaType": "application/json"},
        ),
    ]
    id: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=MAX_ID_LENGTH,
                pattern="^[^\\u0000]+$",
                description="The job id (a UUID or ULID is usual); omit it and the job id "
                "is the entry's stream ID.",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    attempt: (
        Annotated[
            str,
            msgspec.Meta(
                pattern="^([1-9][0-9]{0,5}|1000000)$",
                description="The 1-based attempt number in decimal; default 1 (retries set it).",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    traceparent: (
        Annotated[
            str,
            msgspec.Meta(
                pattern="^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                description="W3C Trace Context `traceparent` of the producer's span: the "
                "job's CONSUMER span becomes its child.",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    tracestate: (
        Annotated[
            str,
            msgspec.Meta(description="W3C Trace Context `tracestate` of the producer."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


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
    """The enqueue time: the millisecond part of a stream ID."""
    return int(entry_id.partition("-")[0])


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

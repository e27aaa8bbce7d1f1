"""The stream envelope: an entry's flat string fields decoded into a typed record.

Knows the producer wire format (see the README) and nothing of any queue's payload.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from jobstream.schema.times import entry_ms

__all__ = [
    "MAX_ATTEMPT",
    "MAX_ID_LENGTH",
    "MAX_TIME_MS",
    "EntryFields",
    "Envelope",
    "EnvelopeError",
    "created_ms",
    "decode_envelope",
    "enqueued_at_ms",
    "job_id_problem",
    "safe_attempt",
    "safe_job_id",
    "trace_context",
]

MAX_ID_LENGTH = 200
MAX_ATTEMPT = 1_000_000
# 9999-12-31T23:59:59.999Z: the latest time both PostgreSQL and Python's datetime hold.
MAX_TIME_MS = 253_402_300_799_999
_KNOWN = frozenset({b"payload", b"id", b"attempt", b"traceparent", b"tracestate"})
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# W3C Trace Context: printable ASCII, and OpenTelemetry refuses a longer traceparent.
_MAX_TRACE_FIELD = 512


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
                pattern="^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
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
    created_ms: (
        Annotated[
            str,
            msgspec.Meta(
                pattern="^(0|[1-9][0-9]{0,14})$",
                description="The job's creation time in ms since the epoch; default: the "
                "entry ID's time. Retries and replays carry it from the job's first entry: "
                "it names the job's time partition in PostgreSQL.",
            ),
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
    """The enqueue time: the millisecond part of a stream ID, clamped to `MAX_TIME_MS`.

    A producer may `XADD` an explicit ID (up to `18446744073709551615-0`) that is no time
    any store can hold; such an entry, and every `*` entry after it in the same stream,
    is recorded as enqueued at `MAX_TIME_MS` rather than refused.
    """
    try:
        return min(entry_ms(entry_id), MAX_TIME_MS)
    except ValueError:
        return 0


def created_ms(entry_id: str, fields: dict[bytes, bytes]) -> int:
    """The job's creation time (ms since the epoch): the entry's `created_ms`, which
    retries and replays carry from the job's first entry, else the entry ID's time.

    A `created_ms` that is not a decimal number of at most 15 digits counts as absent;
    like the entry ID's time, it is clamped to `MAX_TIME_MS`.
    """
    raw = fields.get(b"created_ms")
    if raw is not None and 0 < len(raw) <= 15 and raw.isdigit():
        return min(int(raw), MAX_TIME_MS)
    return enqueued_at_ms(entry_id)


def _utf8(raw: bytes, name: str) -> str:
    """A field's bytes as text, strictly: invalid UTF-8 makes the entry invalid."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise EnvelopeError(f"field {name!r} is not valid UTF-8") from None


def job_id_problem(job_id: str) -> str | None:
    """Why `job_id` cannot name a job (too long, a control character: logs, keys), or None."""
    if len(job_id) > MAX_ID_LENGTH:
        return f"is {len(job_id)} characters, at most {MAX_ID_LENGTH} allowed"
    if not (job_id.isascii() and job_id.isprintable()) and _CONTROL.search(job_id):
        return "contains a control character"
    return None


def _attempt(raw: bytes) -> int:
    """The `attempt` field; its length is checked first (int() refuses 4,300+ digits)."""
    try:
        attempt = int(raw) if len(raw) <= 20 else None
    except ValueError:
        raise EnvelopeError("field 'attempt' is not an integer") from None
    if attempt is None or attempt > MAX_ATTEMPT:
        shown = attempt if attempt is not None else f"{len(raw)} characters long"
        raise EnvelopeError(f"field 'attempt' is {shown}, at most {MAX_ATTEMPT} allowed")
    if attempt < 1:
        raise EnvelopeError("field 'attempt' must be at least 1")
    return attempt


def _trace_field(raw: bytes | None) -> str | None:
    """A trace-context field, or None when absent or no W3C value (then it is ignored)."""
    if raw is None or not (0 < len(raw) <= _MAX_TRACE_FIELD and raw.isascii()):
        return None
    text = raw.decode("ascii")
    return text if text.isprintable() else None


def trace_context(fields: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """An entry's `traceparent` and `tracestate`, each None when absent or malformed."""
    return _trace_field(fields.get(b"traceparent")), _trace_field(fields.get(b"tracestate"))


def decode_envelope(entry_id: str, fields: dict[bytes, bytes]) -> Envelope:
    """Decode an entry's fields; raise EnvelopeError naming what is wrong.

    The job id defaults to the entry ID; unknown fields are kept in `extra`. Raises nothing
    else, for any field map (tests/engine/test_every_entry_one_row.py holds it to that).
    """
    payload = fields.get(b"payload")
    raw_id = fields.get(b"id")
    job_id = entry_id if raw_id is None or raw_id == b"" else _utf8(raw_id, "id")
    problem = job_id_problem(job_id)
    if problem is not None:
        raise EnvelopeError(f"field 'id' {problem}")
    if payload is None:
        raise EnvelopeError("field 'payload' is missing")
    raw_attempt = fields.get(b"attempt")
    attempt = 1 if raw_attempt is None else _attempt(raw_attempt)
    traceparent, tracestate = trace_context(fields)
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
        traceparent=traceparent,
        tracestate=tracestate,
        extra=extra,
    )


def safe_job_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The job id to record an invalid entry under: its `id` if usable, else the entry ID."""
    raw = fields.get(b"id")
    if raw and len(raw) <= 4 * MAX_ID_LENGTH:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return entry_id
        if job_id_problem(text) is None:
            return text
    return entry_id


def safe_attempt(fields: dict[bytes, bytes]) -> int:
    """The attempt to record an invalid entry under: its `attempt` if valid, else 1."""
    raw = fields.get(b"attempt")
    if raw is None:
        return 1
    try:
        return _attempt(raw)
    except EnvelopeError:
        return 1

"""Raw mail shared by `email:processing` and `bounce`: base64 decoding under a size limit."""

from __future__ import annotations

import base64
import binascii
import hashlib

from jobstream.streams import PermanentError

__all__ = ["decode_raw", "sha256_hex"]


def decode_raw(raw_b64: str, limit: int) -> bytes:
    """Decode `raw_b64` (line breaks allowed); PermanentError if invalid or over `limit` bytes."""
    try:
        raw = base64.b64decode(raw_b64, validate=True)
    except binascii.Error:
        try:
            raw = base64.b64decode("".join(raw_b64.split()), validate=True)
        except binascii.Error as exc:
            raise PermanentError(f"raw_b64 is not valid base64: {exc}") from None
    if len(raw) > limit:
        raise PermanentError(
            f"message of {len(raw)} bytes exceeds the limit of {limit} bytes"
            " (JOBSTREAM_MAX_INBOUND_BYTES)"
        )
    return raw


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

"""One parser process of the pool (`python -m jobstream.consumers.worker.parseproc`): parse
what stdin brings.

It serves one request at a time, each a frame on stdin (4-byte big-endian length, then a
msgpack `Request`: the name of a parser and the raw message bytes), and answers each with a
frame on stdout (a msgpack `Reply`: the parser's msgspec struct, or an error line). It runs
only the parsers named in `PARSERS`, exits when stdin closes, and exits at once if its
parent goes away, so a parse never outlives the worker that asked for it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import msgspec

from jobstream.consumers.mail.dsn import parse_bounce
from jobstream.consumers.mail.inbound import parse_message

__all__ = ["PARSERS", "Reply", "Request", "answer", "read_frame", "serve", "write_frame"]

PARSERS: dict[str, Callable[[bytes], msgspec.Struct]] = {
    "inbound": parse_message,
    "bounce": parse_bounce,
}
"""The parsers a request may name: pure functions of raw bytes to a msgspec struct."""

_HEADER_BYTES = 4
_PARENT_CHECK_S = 1.0
_SURROGATE = re.compile("[\ud800-\udfff]")


class Request(msgspec.Struct, frozen=True, array_like=True):
    """What a child is asked: the parser to run (a key of `PARSERS`) and its input."""

    parser: str
    raw: bytes


class Reply(msgspec.Struct, frozen=True, array_like=True):
    """What a child answers: the parser's result, or why it could not run."""

    error: str | None  # one line, when the parse could not run
    result: msgspec.Raw  # the parser's struct, msgpack-encoded


def write_frame(sink: IO[bytes], data: bytes) -> None:
    sink.write(len(data).to_bytes(_HEADER_BYTES, "big"))
    sink.write(data)
    sink.flush()


def read_frame(source: IO[bytes]) -> bytes | None:
    """The next frame, or None when the input ended."""
    header = source.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
        return None
    size = int.from_bytes(header, "big")
    data = source.read(size)
    return data if len(data) == size else None


def _encode(result: Any) -> bytes:
    """Msgpack of `result`; lone surrogates (raw 8-bit bytes) become U+FFFD, as UTF-8 needs."""
    try:
        return msgspec.msgpack.encode(result)
    except UnicodeEncodeError:
        plain = msgspec.to_builtins(result, builtin_types=(dt.datetime,))
        return msgspec.msgpack.encode(_sanitize(plain))


def _sanitize(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize(v) for v in value]
    return value


def answer(data: bytes) -> bytes:
    """Run the request in `data`; return the encoded Reply. Never raises."""
    try:
        request = msgspec.msgpack.decode(data, type=Request)
        parser = PARSERS[request.parser]
        return msgspec.msgpack.encode(Reply(None, msgspec.Raw(_encode(parser(request.raw)))))
    except Exception as exc:  # parser boundary: whatever went wrong goes back as one line
        error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return msgspec.msgpack.encode(Reply(error, msgspec.Raw(msgspec.msgpack.encode(None))))


def _watch_parent(parent: int) -> None:
    """Exit as soon as the parent is gone: an orphaned parse would burn CPU for nobody."""
    while True:
        time.sleep(_PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


def serve(source: IO[bytes], sink: IO[bytes]) -> None:
    """Answer requests until the input ends."""
    while (data := read_frame(source)) is not None:
        write_frame(sink, answer(data))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when parsing stops
    # Frames go to a private copy of stdout; anything printed goes to stderr instead.
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with sink, contextlib.suppress(BrokenPipeError):  # the parent went away mid-answer
        serve(sys.stdin.buffer, sink)


if __name__ == "__main__":
    main()

"""Logging setup: every record carries the current `trace_id`/`span_id`; text or JSON lines.

Both formats scrub secrets (`jobstream.otel.redact.scrub`) from the message and the traceback, and
a record is always exactly one line: job ids, errors and payload text come from producers,
and a newline in one of them must not forge a record (text escapes every control and
line-breaking character; JSON escapes them inside its strings).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from typing import IO, Any, Literal

import msgspec
from opentelemetry import trace

from jobstream.otel.redact import scrub

__all__ = [
    "JOB_FIELDS",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "TraceContextFilter",
    "escape_controls",
    "setup_logging",
]

LogFormat = Literal["text", "json"]
_encoder = msgspec.json.Encoder()
# C0, DEL, C1, the Unicode line and paragraph separators, bidirectional overrides (which
# reorder what a terminal shows) and lone surrogates (which no encoder writes).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What JSON allows raw inside a string but line splitters (and JavaScript) break on.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    c = m[0]
    return _SHORT.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """`text` on one line: control and line-breaking characters written as `\\n`, `\\x1b`,
    `\\u2028` ..."""
    return _UNSAFE.sub(_escape, text)


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (hex; empty outside a span) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = record.span_id = ""
        return True


class TextFormatter(logging.Formatter):
    """`time level logger message`, then `trace_id=… span_id=…` inside a span, then ` | `
    and the traceback, all on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        fields = [self.formatTime(record), record.levelname, record.name]
        line = " ".join([*fields, scrub(record.getMessage())])
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line += f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += " | " + scrub(record.exc_text)
        if record.stack_info:
            line += " | " + self.formatStack(record.stack_info)
        return escape_controls(line)


# Fields a record may carry as `extra=` (the worker's job lines do), written as JSON fields.
JOB_FIELDS = ("job", "queue", "attempt", "outcome", "duration_ms", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id, span_id, the job's
    fields when the record carries them (`JOB_FIELDS`)[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "trace_id": getattr(record, "trace_id", "") or None,
            "span_id": getattr(record, "span_id", "") or None,
        }
        for name in JOB_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exception"] = scrub(record.exc_text)
        try:
            text = _encoder.encode(out).decode()
        except UnicodeEncodeError:  # a lone surrogate: write it as an escape instead
            text = _encoder.encode({k: _no_surrogates(v) for k, v in out.items()}).decode()
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _no_surrogates(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging(level: str, fmt: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Give the root logger a handler in this format (once per process: the CLI's `main`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))

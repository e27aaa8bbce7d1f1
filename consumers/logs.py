"""Logging setup: every record carries the current `trace_id`/`span_id`; text or JSON lines.

Both formats scrub secrets (`otel.redact.scrub`) from the message and the traceback.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import IO, Any, Literal

import msgspec
from opentelemetry import trace

from otel.redact import scrub

__all__ = ["JsonFormatter", "LogFormat", "TextFormatter", "TraceContextFilter", "setup_logging"]

LogFormat = Literal["text", "json"]
_encoder = msgspec.json.Encoder()


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
    """`time level logger message`, then `trace_id=… span_id=…` inside a span."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return scrub(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line += f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id, span_id[, exception]."""

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
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exception"] = scrub(record.exc_text)
        return _encoder.encode(out).decode()


def setup_logging(level: str, fmt: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Give the root logger a handler in this format (once per process: the CLI's `main`)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))

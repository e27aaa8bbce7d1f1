"""Turning auto-instrumentation (opentelemetry-instrument's redis, asyncpg, ...) off and on
for a block, through the context keys every instrumentation checks.

The engine's own polling (reads, heartbeats, reclaims, promotion, flushes) runs
`suppressed()`, so it adds no root span a command; a job runs `instrumented()` again, so
its handler's SQL and Redis calls nest under its `process` span.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

__all__ = ["instrumented", "suppressed"]

# The older, plain key that opentelemetry-instrumentation still honours beside the API's.
_PLAIN_KEY = "suppress_instrumentation"


@contextmanager
def _with_suppression(on: bool) -> Iterator[None]:
    ctx = otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, on)
    ctx = otel_context.set_value(_PLAIN_KEY, on, ctx)
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def suppressed() -> AbstractContextManager[None]:
    """Instrumentations create no spans in this block (and in tasks it starts)."""
    return _with_suppression(True)


def instrumented() -> AbstractContextManager[None]:
    """Instrumentations create spans again in this block, even inside `suppressed()`."""
    return _with_suppression(False)

"""Turning auto-instrumentation (opentelemetry-instrument's redis, asyncpg, ...) off for the
engine's own work and on for jobs, through the context keys every instrumentation checks.

The engine's polling (reads, heartbeats, reclaims, promotion, flushes) runs `suppressed()`,
so it adds no root span a command; jobs run in `instrumented_context()`, so a handler's
SQL and Redis calls nest under its `process` span.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

__all__ = ["instrumented_context", "suppressed"]

# The older, plain key that opentelemetry-instrumentation still honours beside the API's.
_PLAIN_KEY = "suppress_instrumentation"


def _attach(on: bool) -> contextvars.Token[otel_context.Context]:
    ctx = otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, on)
    return otel_context.attach(otel_context.set_value(_PLAIN_KEY, on, ctx))


@contextmanager
def suppressed() -> Iterator[None]:
    """Instrumentations create no spans in this block, nor in the tasks it starts."""
    token = _attach(True)
    try:
        yield
    finally:
        otel_context.detach(token)


def instrumented_context() -> contextvars.Context:
    """A copy of the current context with instrumentation on, even inside `suppressed()`.

    Give each task its own `.copy()` (`loop.create_task(coro, context=...)`): one copy
    costs about 0.1 µs, where switching in every job would cost several.
    """
    ctx = contextvars.copy_context()
    ctx.run(_attach, False)  # the change stays inside `ctx`
    return ctx

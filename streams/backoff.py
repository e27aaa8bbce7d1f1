"""Waiting out an outage: retry with exponential backoff, say once that it began and ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["retry_until_done"]

ErrorTypes = type[BaseException] | tuple[type[BaseException], ...]


async def retry_until_done(
    fn: Callable[[], Awaitable[None]],
    *,
    errors: ErrorTypes,
    what: str,
    down: set[str],
    log: logging.Logger,
    stopping: asyncio.Event | None = None,
) -> bool:
    """Await `fn()` until it raises none of `errors`; True if it had to wait.

    Waits 0.1 s, doubling up to 5 s, between tries. `down` holds what is known to be
    unavailable, so an outage is logged once when it begins and once when it ends, however
    many callers or tries see it. Gives up (returning) once `stopping` is set.
    """
    delay, waited = 0.1, False
    while True:
        try:
            await fn()
        except errors as exc:
            if what not in down:
                log.error("%s unavailable (%s: %s); retrying with backoff up to 5s",
                          what, type(exc).__name__, exc)  # fmt: skip
                down.add(what)
            if stopping is not None and stopping.is_set():
                return waited
            waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if what in down:
            log.warning("%s is back", what)
            down.discard(what)
        return waited

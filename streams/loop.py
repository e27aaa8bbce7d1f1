"""The event loop a worker runs on: uvloop where it is installed, else asyncio's own.

uvloop runs the same asyncio code with a loop written in C (libuv): less time in the loop
itself per job. Nothing in the engine depends on which loop runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from jobstream.streams.errors import ConfigError

__all__ = ["loop_factory", "loop_name", "run"]

T = TypeVar("T")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for `choice` (`auto`, `uvloop`, `asyncio`); None: asyncio's own.

    `auto` takes uvloop when it can be imported and falls back to asyncio's loop.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "JOBSTREAM_EVENT_LOOP is uvloop, but uvloop is not installed"
            ) from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """Run `main` to completion on the chosen loop (what `asyncio.run` does otherwise)."""
    try:
        factory = loop_factory(choice)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name() -> str:
    """`uvloop` or `asyncio`: which loop runs the calling coroutine."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]

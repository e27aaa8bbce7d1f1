"""The application: the platform's queues on the engine, in one folder per concern.

What someone writing a queue imports, e.g. `from jobstream.consumers import handler, Deps`.
The names load on first use, so importing one room (say the pure `mail` code, in a parse
process) does not load the worker runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobstream.consumers.worker.deps import Deps
    from jobstream.consumers.worker.events import emit
    from jobstream.consumers.worker.handler import HandlerFn, HandlerSpec, handler
    from jobstream.consumers.worker.registry import HANDLERS
    from jobstream.consumers.worker.runtime import connect, make_engine, run_worker
    from jobstream.consumers.worker.settings import Settings
    from jobstream.streams import Job, PermanentError, Policy, RetryableError

__all__ = [
    "HANDLERS",
    "Deps",
    "HandlerFn",
    "HandlerSpec",
    "Job",
    "PermanentError",
    "Policy",
    "RetryableError",
    "Settings",
    "connect",
    "emit",
    "handler",
    "make_engine",
    "run_worker",
]

_HOME = {
    "HANDLERS": "jobstream.consumers.worker.registry",
    "Deps": "jobstream.consumers.worker.deps",
    "HandlerFn": "jobstream.consumers.worker.handler",
    "HandlerSpec": "jobstream.consumers.worker.handler",
    "Job": "jobstream.streams",
    "PermanentError": "jobstream.streams",
    "Policy": "jobstream.streams",
    "RetryableError": "jobstream.streams",
    "Settings": "jobstream.consumers.worker.settings",
    "connect": "jobstream.consumers.worker.runtime",
    "emit": "jobstream.consumers.worker.events",
    "handler": "jobstream.consumers.worker.handler",
    "make_engine": "jobstream.consumers.worker.runtime",
    "run_worker": "jobstream.consumers.worker.runtime",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""A worker for the chaos test: the real `analytics` and `email-sending` handlers plus the
test queue, as `python -m tests.chaos_worker`."""

from __future__ import annotations

import asyncio
import logging
import sys

from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import run_worker
from jobstream.consumers.worker.settings import Settings
from tests import handlers

REAL_QUEUES = ("analytics", "email-sending")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    code = asyncio.run(
        run_worker(
            Settings.from_env(),
            [*REAL_QUEUES, handlers.QUEUE],
            handlers=(*HANDLERS, *handlers.SPECS),
        )
    )
    sys.exit(code)


if __name__ == "__main__":
    main()

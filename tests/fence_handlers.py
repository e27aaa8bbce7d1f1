"""Test queues for fencing: the first delivery of a job is slow, any later one is quick.

So a replica that is paused mid-job and loses its entries sees its handlers time out on
waking, while the replica that took them over completes them at once.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.streams import Job, Policy
from tests.handlers import Work, executions_key

ONCE = "test-fence-once"  # one attempt: a timeout would dead-letter the job
RETRY = "test-fence-retry"  # three attempts: a timeout would schedule a retry


async def _first_slow(w: Work, job: Job, deps: Deps) -> dict[str, Any]:
    await deps.redis.hincrby(executions_key(deps), job.id, 1)
    if job.delivery_count == 1:
        await asyncio.sleep(w.sleep_s)
    return {"delivery": job.delivery_count}


once = handler(ONCE, Work, Policy(max_attempts=1, timeout_s=2, concurrency=16))(_first_slow)
retry = handler(
    RETRY, Work, Policy(max_attempts=3, timeout_s=2, backoff_base_s=0.01, concurrency=16)
)(_first_slow)
SPECS: tuple[HandlerSpec[Any], ...] = (once, retry)
PAYLOADS = {ONCE: Work, RETRY: Work}


def main() -> None:
    """`python -m tests.fence_handlers`: a worker serving the fencing test queues."""
    import logging

    from jobstream.consumers.worker.runtime import run_worker
    from jobstream.consumers.worker.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    code = asyncio.run(run_worker(Settings.from_env(), None, None, handlers=SPECS))
    sys.exit(code)


if __name__ == "__main__":
    main()

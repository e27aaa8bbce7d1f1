"""Test-only queues whose handler counts its executions in Redis and misbehaves on demand."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import msgspec

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.streams import Job, PermanentError, Policy, RetryableError

QUEUE = "test-work"


class Work(msgspec.Struct, frozen=True, kw_only=True):
    """What the test handler should do."""

    sleep_s: float = 0.0
    fail_times: int = 0  # raise RetryableError on the first N attempts
    permanent: bool = False
    boom: bool = False  # raise an unforeseen exception
    result_text: str | None = None  # returned in the result
    crash: bool = False  # SIGKILL the worker process running it (a poison job)


def executions_key(deps: Deps) -> str:
    return f"{deps.keys.prefix}executions"


@handler(
    QUEUE,
    Work,
    Policy(max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.2, timeout_s=20, concurrency=16),
)
async def work(w: Work, job: Job, deps: Deps) -> dict[str, Any]:
    """Count this execution, then sleep / fail as asked. Not idempotent on purpose."""
    await deps.redis.hincrby(executions_key(deps), job.id, 1)
    if w.crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if w.sleep_s:
        await asyncio.sleep(w.sleep_s)
    if w.permanent:
        raise PermanentError(f"job {job.id} refused for good")
    if w.boom:
        raise ZeroDivisionError("unforeseen")
    if job.attempt <= w.fail_times:
        raise RetryableError(f"transient failure on attempt {job.attempt}")
    if w.result_text is not None:
        return {"attempt": job.attempt, "text": w.result_text}
    return {"attempt": job.attempt}


SPECS: tuple[HandlerSpec[Any], ...] = (work,)
PAYLOADS = {QUEUE: Work}


def main() -> None:
    """`python -m tests.handlers [--concurrency N] [--burst]`: a worker serving the test queue."""
    import logging

    from jobstream.consumers.worker.runtime import run_worker
    from jobstream.consumers.worker.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    burst = "--burst" in sys.argv
    conc = (
        int(sys.argv[sys.argv.index("--concurrency") + 1]) if "--concurrency" in sys.argv else None
    )
    code = asyncio.run(run_worker(Settings.from_env(), None, conc, burst=burst, handlers=SPECS))
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from typing import Any

from schema.payloads import AnalyticsEvent


def event(event_id: str, type_: str = "open", mailbox: str = "mb-1", **kw: Any) -> AnalyticsEvent:
    return AnalyticsEvent(
        event_id=event_id,
        type=type_,  # type: ignore[arg-type]
        mailbox_id=mailbox,
        occurred_at=kw.pop("occurred_at", dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)),
        **kw,
    )


async def run(
    *args: str, env: dict[str, str] | None = None, limit_s: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run a command without blocking the event loop; return its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(list(args), proc.returncode or 0, out.decode(), err.decode())


async def jobstream(env: dict[str, str], *args: str, limit_s: float = 90) -> Any:
    """`jobstream ARGS` as a subprocess of this interpreter."""
    return await run(sys.executable, "-m", "consumers.cli", *args, env=env, limit_s=limit_s)


def entry_seconds(entry_id: Any) -> float:
    """An entry ID's time in epoch seconds, as the recorder stores a job's `created_at`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.partition("-")[0]) / 1000.0

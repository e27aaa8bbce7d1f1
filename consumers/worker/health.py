"""The worker's health file: how `jobstream health` in a container sees this replica's loops.

The worker rewrites it every few seconds with its consumer name and what its engine says
of itself; a file that stops changing means the worker is stuck or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import time

import msgspec

from jobstream.streams import Engine

__all__ = ["HealthReport", "read_report", "write_report", "write_reports"]


class HealthReport(msgspec.Struct, frozen=True):
    consumer: str
    pid: int
    written_at: float
    problem: str | None


def write_report(path: pathlib.Path, report: HealthReport) -> None:
    """Replace the file at `path` with `report` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.encode(report))
    tmp.replace(path)  # atomic: a reader never sees half a file


async def write_reports(engine: Engine, path: str, interval_s: float) -> None:
    """Keep the file current until cancelled, then remove it."""
    target = pathlib.Path(path)
    try:
        while True:
            report = HealthReport(engine.cfg.consumer, os.getpid(), time.time(), engine.health())
            await asyncio.to_thread(write_report, target, report)
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(target.unlink)


def read_report(path: str, max_age_s: float) -> tuple[HealthReport | None, str | None]:
    """The report and None, or what is wrong with it."""
    try:
        report = msgspec.json.decode(pathlib.Path(path).read_bytes(), type=HealthReport)
    except FileNotFoundError:
        return None, f"no health file at {path}: the worker is not running"
    except (OSError, msgspec.DecodeError) as exc:
        return None, f"unreadable health file {path}: {exc}"
    age = time.time() - report.written_at
    if age > max_age_s:
        return report, f"worker {report.consumer} last reported {age:.0f}s ago"
    return report, report.problem

"""`jobstream prune`: show and apply the job tables' retention (whole time partitions)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import msgspec

from jobstream.consumers.cli.render import render_table
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import partition_policy
from jobstream.streams import Partition, PrunePlan, ensure_partitions, prune

__all__ = ["add_parser", "run"]

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> float:
    """`30s`, `15m`, `12h`, `7d` (as `dlq purge --older-than`) in seconds."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"use a positive number and s, m, h or d, not {text!r}")
    return float(int(match[1]) * _UNITS_S[match[2]])


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "prune",
        help="drop the job partitions past the retention (JOBSTREAM_RETENTION_S)",
        description="Drop the time partitions of jobs and job_executions whose every job was "
        "created before the retention and is over; keep and list those holding a job that "
        "is not. Also creates the partitions ahead.",
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would be dropped")
    p.add_argument(
        "--older-than",
        type=_duration_s,
        help="this retention instead of the configured one: 7d, 12h",
    )
    p.add_argument("--json", action="store_true")


def _row(p: Partition, action: str) -> dict[str, Any]:
    return {
        "partition": p.name,
        "from": p.lower.isoformat() if p.lower else "-",
        "to": p.upper.isoformat() if p.upper else "-",
        "rows": p.rows,
        "mb": round(p.bytes / 2**20, 1),
        "live": p.live,
        "action": action,
    }


def _rows(plan: PrunePlan, dry_run: bool) -> list[dict[str, Any]]:
    dropping = "would drop" if dry_run else "dropped"
    return [_row(p, dropping) for p in plan.dropped] + [_row(p, "kept") for p in plan.kept]


async def run(deps: Deps, args: argparse.Namespace) -> int:
    """Print what the retention drops (or would, with --dry-run) and what it keeps."""
    policy = partition_policy(deps.settings)
    if args.older_than is not None:
        policy = dataclasses.replace(policy, retention_s=args.older_than)
    async with deps.pool.acquire() as conn:
        if not args.dry_run:
            await ensure_partitions(conn, policy)
        plan = await prune(conn, policy, dry_run=args.dry_run)
    rows = _rows(plan, args.dry_run)
    if args.json:
        out = {"cutoff": plan.cutoff.isoformat(), "partitions": rows,
               "default_rows": plan.default_rows}  # fmt: skip
        print(msgspec.json.encode(out).decode())
        return 0
    if rows:
        print(render_table(rows, ["partition", "from", "to", "rows", "mb", "live", "action"]))
    mb = round(sum(p.bytes for p in plan.dropped) / 2**20, 1)
    verb = "would drop" if args.dry_run else "dropped"
    print(f"jobs created before {plan.cutoff.isoformat()}: {verb} {len(plan.dropped)} "
          f"partitions ({mb} MB), kept {len(plan.kept)} holding jobs not over")  # fmt: skip
    for p in plan.kept:
        print(f"kept {p.name}: {p.live} jobs queued, running or retrying "
              "(it goes once they are over)")  # fmt: skip
    if plan.default_rows:
        print(f"{plan.default_rows} jobs wait in jobs_default for a partition "
              "(workers and `jobstream prune` create it)")  # fmt: skip
    return 0

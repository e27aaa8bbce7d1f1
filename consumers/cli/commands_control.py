"""`jobstream schedule ...`, `jobstream job cancel ID` and `publish --unique-for`: recurring
jobs and job control from the command line."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

import msgspec

from jobstream.consumers.cli.ops import levels_of
from jobstream.consumers.worker.deps import Deps
from jobstream.schema.times import utc_iso
from jobstream.streams import ConfigError
from jobstream.streams.cancel import Cancelled, cancel_job
from jobstream.streams.schedules import (
    CatchUp,
    Schedule,
    add_schedule,
    list_schedules,
    remove_schedule,
    set_paused,
)

__all__ = ["ALREADY", "add_parsers", "run"]

ALREADY = 3
"""Exit code when nothing was done because it had happened already: the job is already
over (`job cancel`), or its id was published within the unique window (`publish`)."""


def _seconds(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, not {text!r}")
    return value


def _window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.001 <= value <= 366 * 86400:
        raise argparse.ArgumentTypeError(f"must be 0.001 to 31622400 seconds, not {text!r}")
    return value


def add_parsers(sub: Any, publish: argparse.ArgumentParser, job: argparse.ArgumentParser) -> None:
    """The `schedule` subcommands, `job cancel ID` and `publish --unique-for`."""
    publish.add_argument(
        "--unique-for",
        type=_window,
        metavar="S",
        help="refuse the job id if published to the queue within S seconds (needs --id)",
    )
    publish.add_argument("--priority", metavar="LEVEL", help="one of the queue's priority levels")
    job.add_argument("cancel_id", nargs="?", metavar="ID", help="`job cancel ID`: cancel it")
    sched = sub.add_parser("schedule", help="recurring jobs")
    ops = sched.add_subparsers(dest="schedule", required=True)
    add = ops.add_parser("add", help="publish a job on a cron expression or every N seconds")
    add.add_argument("name")
    add.add_argument("--queue", required=True)
    add.add_argument("--payload", required=True, help="the payload of every run, as JSON")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='five fields, e.g. "0 6 * * MON-FRI"')
    when.add_argument("--every", type=_seconds, metavar="SECONDS")
    add.add_argument("--tz", default="UTC", help="time zone of --cron (IANA name; default UTC)")
    add.add_argument(
        "--catch-up",
        choices=[c.value for c in CatchUp],
        default=CatchUp.LATEST.value,
        help="after every replica was down: latest (default), all or none of the missed runs",
    )
    ls = ops.add_parser("list", help="schedules with their next and last run")
    ls.add_argument("--json", action="store_true")
    for verb, text in (("pause", "stop publishing"), ("resume", "publish again, from the next "
                       "occurrence"), ("remove", "delete the schedule")):  # fmt: skip
        ops.add_parser(verb, help=text).add_argument("name")


async def run(args: argparse.Namespace, deps: Deps) -> int | None:
    """Run the command when it is one of ours; None otherwise."""
    if args.command == "schedule":
        return await _schedule(args, deps)
    if args.command == "job" and args.cancel_id is not None:
        if args.job_id != "cancel":
            raise ConfigError(f"unexpected argument {args.cancel_id!r} (job ID, or job cancel ID)")
        return await _cancel(deps, args.cancel_id)
    if args.command == "publish" and args.unique_for is not None:
        return await _publish_unique(deps, args)

    return None


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else utc_iso(when.timestamp())


def _row(s: Schedule) -> dict[str, Any]:
    return {
        "name": s.name,
        "queue": s.queue,
        "runs": f"cron {s.cron} {s.tz}" if s.cron else f"every {s.every_s}s",
        "catch_up": s.catch_up.value,
        "state": "paused" if s.paused else "active",
        "next_run": None if s.paused else _iso(s.next_run_at),
        "last_run": _iso(s.last_run_at),
        "last_job_id": s.last_job_id,
    }


async def _schedule(args: argparse.Namespace, deps: Deps) -> int:
    if args.schedule == "add":
        payload = deps.publisher.encode(args.queue, args.payload).decode()  # PublishError: one line
        s = Schedule(
            name=args.name,
            queue=args.queue,
            payload=payload,
            cron=args.cron,
            every_s=args.every,
            tz=args.tz,
            catch_up=CatchUp(args.catch_up),
        )
        if not await add_schedule(deps.pool, s):
            raise ConfigError(f"schedule {args.name!r} exists already (remove it first)")
        added = [x for x in await list_schedules(deps.pool) if x.name == args.name]
        print(f"schedule {args.name} added: next run {_iso(added[0].next_run_at)}")
        return 0
    if args.schedule == "list":
        rows = [_row(s) for s in await list_schedules(deps.pool)]
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(rows)).decode())
        else:
            from jobstream.consumers.cli.render import (
                render_table,  # the CLI's table, when printing
            )

            print(render_table(rows, list(_row(Schedule(name="", queue="", payload="")))))
        return 0
    if args.schedule == "remove":
        queue = await remove_schedule(deps.pool, args.name)
        if queue is not None:
            await deps.redis.delete(deps.keys.schedule(queue, args.name))
            print(f"schedule {args.name} removed")
            return 0
    elif await set_paused(deps.pool, args.name, args.schedule == "pause"):
        print(f"schedule {args.name} {'paused' if args.schedule == 'pause' else 'resumed'}")
        return 0
    print(f"jobstream: no schedule {args.name!r}", file=sys.stderr)
    return 1


async def _cancel(deps: Deps, job_id: str) -> int:
    answer = await cancel_job(
        deps.redis,
        deps.pool,
        deps.keys,
        job_id,
        group=deps.settings.group,
        levels=levels_of,
        hash_ttl_s=deps.settings.hash_ttl_s,
    )
    if answer.outcome is Cancelled.UNKNOWN:
        print(f"jobstream: no job {job_id!r} in PostgreSQL or Redis", file=sys.stderr)
        return 1
    if answer.outcome is Cancelled.TERMINAL:
        print(f"job {job_id} is already {answer.status}: nothing to cancel")
        return ALREADY
    if answer.outcome is Cancelled.CANCELLED:
        print(f"cancelled job {job_id} of {answer.queue}: it was waiting and will not run")
        return 0
    where = f" on {answer.consumer}" if answer.consumer else ""
    print(f"cancel requested: job {job_id} of {answer.queue} is running{where}; its handler "
          "is cancelled and the attempt recorded cancelled")  # fmt: skip
    return 0


async def _publish_unique(deps: Deps, args: argparse.Namespace) -> int:
    if not args.job_id:
        raise ConfigError("--unique-for needs --id (the id that must be unique)")
    queue = deps.publisher.target(args.queue, args.priority)
    done = await deps.publisher.publish_unique(
        queue, args.payload, args.job_id, args.unique_for, delay_s=args.delay
    )
    print(done.job_id)
    if done.published:
        return 0
    print(f"jobstream: job {done.job_id} was published to {args.queue} within the last "
          f"{args.unique_for:g}s ({done.where}): not published again", file=sys.stderr)  # fmt: skip
    return ALREADY

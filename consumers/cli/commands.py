"""What each `jobstream` subcommand does, and how it prints."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from jobstream.consumers.cli import commands_control, commands_mail, commands_prune, ops
from jobstream.consumers.cli.render import (
    Progress,
    render_json,
    render_json_line,
    render_rows,
    render_table,
)
from jobstream.consumers.queues.warmup import WARMUP_SCHEDULE, ensure_warmup_schedule
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import (
    check_selection,
    connect,
    partition_policy,
    run_worker,
    service_version,
)
from jobstream.consumers.worker.settings import Settings
from jobstream.consumers.worker.supervisor import (
    ChildOptions,
    for_slot,
    run_processes,
    usable_cores,
)
from jobstream.consumers.worker.tls import database_dsn
from jobstream.otel.redact import scrub
from jobstream.otel.tracing import setup_tracing
from jobstream.schema.migrate import MigrationMismatch, apply_migrations
from jobstream.streams import (
    ConfigError,
    PublishError,
    ensure_partitions,
    list_dead,
    purge_dead,
    read_dead,
    replay_dead,
)
from jobstream.streams.dead_letters import DeadLetter, count_dead, replay_all
from jobstream.streams.queue_partitions import parts_of

__all__ = ["parse_duration_ms", "run"]

_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`30s`, `15m`, `12h`, `7d` → milliseconds; ConfigError otherwise."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use a number and s, m, h or d (e.g. 7d)")
    return int(match[1]) * _UNITS[match[2]]


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the parsed command; return the process exit code."""
    if args.command == "worker":
        return await _worker(args, settings)
    if args.command == "migrate":
        return await _migrate(settings)
    if args.command in ("dashboard", "demo"):
        return await _serve(args, settings)
    async with connect(settings, wait=False) as deps:
        for module_run in (commands_mail.run, commands_control.run):
            done = await module_run(args, deps)
            if done is not None:
                return done
        command = _WITH_DEPS.get(args.command)
        if command is not None:
            return await command(deps, args)
    raise ConfigError(f"unknown command {args.command}")


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """Commands that run until stopped, imported only when asked for."""
    if args.command == "dashboard":
        from jobstream.consumers.dashboard import run_dashboard

        return await run_dashboard(settings, args.host, args.port)
    from jobstream.consumers.demo.main import run_demo

    return await run_demo(settings, args.events)


async def _worker(args: argparse.Namespace, settings: Settings) -> int:
    processes = args.processes or usable_cores()
    metrics_port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    if processes > 1 and args.slot is None:
        check_selection(settings, args.queues)  # a bad selection fails here, not N times
        options = ChildOptions(
            queues=args.queues,
            concurrency=args.concurrency,
            burst=args.burst,
            metrics_port=metrics_port,
            metrics_host=args.metrics_host,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        return await run_processes(settings, processes, options)
    if args.slot is not None:
        settings = for_slot(settings, args.slot, processes)
    return await run_worker(
        settings,
        args.queues,
        args.concurrency,
        burst=args.burst,
        metrics_port=metrics_port,
        metrics_host=args.metrics_host,
        supervised=args.slot is not None,
        supervisor=args.supervisor,
    )


async def _health(deps: Deps, args: argparse.Namespace) -> int:
    problem = await ops.health(deps, args.consumer)
    print(problem or "ok")
    return 1 if problem else 0


_WITH_DEPS: dict[str, Callable[[Deps, argparse.Namespace], Awaitable[int]]] = {
    "publish": lambda deps, a: _publish(deps, a),
    "status": lambda deps, a: _status(deps, a.json, a.watch),
    "workers": lambda deps, a: _workers(deps, a.json),
    "job": lambda deps, a: _job(deps, a.job_id, a.json),
    "dlq": lambda deps, a: _dlq(deps, a),
    "health": lambda deps, a: _health(deps, a),
    "prune": commands_prune.run,
}


async def _publish(deps: Deps, args: argparse.Namespace) -> int:
    # With OTEL_* configured, the PRODUCER span starts the job's trace and travels with it.
    tracing = setup_tracing(service_version(), None)
    try:
        job_id = await deps.publisher.publish(
            args.queue,
            args.payload,
            args.job_id,
            delay_s=args.delay,
            key=args.key,
            priority=args.priority,
        )
    finally:
        await asyncio.to_thread(tracing.shutdown)
    print(job_id)
    return 0


async def _migrate(settings: Settings) -> int:
    try:
        conn = await asyncpg.connect(database_dsn(settings))
    except asyncpg.ClientConfigurationError as exc:  # e.g. sslmode=verify-full, no root cert
        raise ConfigError(f"invalid configuration: DATABASE_URL: {exc.args[0]}") from None
    try:
        applied = await apply_migrations(conn)
        created = await ensure_partitions(conn, partition_policy(settings))
        warmup = await ensure_warmup_schedule(conn)
    except MigrationMismatch as exc:
        raise ConfigError(str(exc)) from None
    finally:
        await conn.close()
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
    print(f"migrations applied: {names}" if applied else "migrations: up to date")
    if created:
        print(f"job partitions created: {', '.join(created)}")
    if warmup:
        print(f"schedule {WARMUP_SCHEDULE} created: the warmup queue's daily run, 00:00 UTC")
    return 0


async def _status(deps: Deps, as_json: bool, watch_s: float | None) -> int:
    if watch_s is None:
        print(await _status_text(deps, render_json if as_json else None))
        return 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not as_json else ""
    task = asyncio.current_task()
    if task is not None:  # Ctrl-C or SIGTERM ends the watch: exit 0 (even where a shell
        # started it in the background with SIGINT ignored)
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    try:
        while True:  # until interrupted: Ctrl-C or SIGTERM ends it with exit 0
            text = await _status_text(deps, render_json_line if as_json else None)
            stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            print(text if as_json else f"{clear}{stamp}  (every {watch_s:g}s)\n{text}\n",
                  flush=True)  # fmt: skip
            await asyncio.sleep(watch_s)
    except asyncio.CancelledError:
        return 0


async def _status_text(deps: Deps, as_json: Callable[[Any], str] | None) -> str:
    rows = await ops.queue_status(deps)
    if as_json is not None:
        return as_json(rows)
    for r in rows:
        jobs = r["jobs"]
        r["jobs"] = " ".join(f"{k}={v}" for k, v in sorted(jobs.items())) or "-"
        r["oldest_pending_s"] = r.pop("oldest_pending_age_s")
    columns = [
        "queue",
        "partitions",
        "length",
        "pending",
        "lag",
        "consumers",
        "stale_consumers",
        "oldest_pending_s",
        "delayed",
        "dead",
        "jobs",
    ]
    return render_table(rows, columns)


async def _workers(deps: Deps, as_json: bool) -> int:
    rows = await ops.workers(deps)
    if as_json:
        print(render_json(rows))
        return 0
    for r in rows:
        r["state"] = "live" if r.pop("live") else "stale"
        r["queues"] = ",".join(r["queues"]) or "-"
    columns = ["consumer", "state", "heartbeat_age_s", "in_flight", "pending", "idle_s",
               "queues", "host", "pid"]  # fmt: skip
    print(render_rows([{c: r.get(c) for c in columns} for r in rows]))
    return 0


async def _job(deps: Deps, job_id: str, as_json: bool) -> int:
    await ops.remember_relays(deps)
    info = await ops.job_info(deps, job_id)
    if info is None or not (info["job"] or info["hash"] or info["waiting"]):
        part = "" if info is None else " (a long stream was searched only in part)"
        print(f"jobstream: no job {job_id!r} in PostgreSQL, Redis or the queues{part}",
              file=sys.stderr)  # fmt: skip
        return 1
    if as_json:
        print(scrub(render_json(info)))
        return 0
    job = info["job"] or {}
    lines = [f"{key:>16}: {value}" for key, value in job.items()]
    if info["job"] is None:
        lines.append("not run by a worker yet (no row in PostgreSQL)")
    if info["waiting"]:
        lines.append("waiting:")
        columns = ["queue", "where", "entry_id", "due_at", "attempt", "traceparent"]
        lines.append(render_table(info["waiting"], columns))
    lines.append("executions:")
    columns = ["attempt", "outcome", "duration_ms", "worker_id", "started_at", "error"]
    lines.append(render_table(info["executions"], columns))
    lines.append("hash:")
    lines += [f"{key:>16}: {value}" for key, value in sorted(info["hash"].items())]
    print(scrub("\n".join(lines)))
    return 0


async def _dlq_queues(deps: Deps, args: argparse.Namespace) -> list[str]:
    """Every queue with a dead stream or a payload; refuse unknown queues and malformed ids."""
    queues = await ops.dead_queues(deps)
    named = getattr(args, "queue", None)
    if named is not None and named not in queues:
        raise ConfigError(f"unknown queue {named!r} (known: {', '.join(queues)})")
    for dead_id in [getattr(args, "dead_id", None), *getattr(args, "dead_ids", [])]:
        if dead_id is not None and not re.fullmatch(r"\d+-\d+", dead_id):
            raise ConfigError(f"invalid dead-letter id {dead_id!r}: ids look like 1764496800000-0")
    return queues


async def _dlq(deps: Deps, args: argparse.Namespace) -> int:
    await ops.remember_relays(deps)
    r, keys = deps.redis, deps.keys
    queues = await _dlq_queues(deps, args)
    if args.dlq == "list":
        rows, letters = [], []
        for queue in [args.queue] if args.queue else queues:
            mine = [
                letter
                for part in await _parts(deps, queue)
                for letter in await list_dead(r, keys, part, args.count)
            ]  # newest first across the queue's partitions
            mine.sort(key=lambda x: tuple(map(int, x.dead_id.split("-"))), reverse=True)
            for letter in mine[: args.count]:
                letters.append(letter)
                f = letter.fields
                rows.append(
                    {
                        "dead_id": letter.dead_id,
                        "queue": queue,
                        "job_id": f.get("job_id"),
                        "reason": f.get("reason"),
                        "attempts": f.get("attempts"),
                        "failed_at": f.get("failed_at"),
                        "error": (f.get("error") or "")[:80],
                    }
                )
        if args.json:
            for row, letter in zip(rows, letters, strict=True):
                row["error"] = letter.fields.get("error")
            print(scrub(render_json(rows)))
            return 0
        columns = ["dead_id", "queue", "job_id", "reason", "attempts", "failed_at", "error"]
        print(scrub(render_table(rows, columns)))
        return 0
    if args.dlq == "show":
        for queue in [args.queue] if args.queue else queues:
            found = await _find_dead(deps, queue, args.dead_id)
            if found is not None:
                print(
                    scrub(render_json({"dead_id": found.dead_id, "queue": queue, **found.fields}))
                )
                return 0
        print(f"jobstream: no dead letter {args.dead_id}", file=sys.stderr)
        return 1
    if args.dlq == "replay":
        return await _replay(deps, args)
    return await _purge(deps, args)


async def _parts(deps: Deps, queue: str) -> list[str]:
    """The queue's partitions, named as queues (`q`, `q#1`, ...)."""
    return await parts_of(deps.redis, deps.keys, queue)


async def _find_dead(deps: Deps, queue: str, dead_id: str) -> DeadLetter | None:
    """A dead letter of the queue by id, in whichever partition holds it."""
    for part in await _parts(deps, queue):
        found = await read_dead(deps.redis, deps.keys, part, dead_id)
        if found is not None:
            return found
    return None


async def _count_dead(deps: Deps, queue: str, older: int | None, *, purge: bool = False) -> int:
    """How many dead letters the queue's partitions hold (older than `older` ms); `purge`:
    delete them too."""
    act = purge_dead if purge else count_dead
    return sum([await act(deps.redis, deps.keys, p, older) for p in await _parts(deps, queue)])


async def _purge(deps: Deps, args: argparse.Namespace) -> int:
    """Delete dead letters for good: only with --yes or a "y" typed at a terminal."""
    queue = args.queue
    older = parse_duration_ms(args.older_than) if args.older_than else None
    which = f" older than {args.older_than}" if args.older_than else ""
    if args.dry_run:
        n = await _count_dead(deps, queue, older)
        print(f"would purge {n} dead letters of {queue}{which}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("dlq purge deletes dead letters for good: add --yes (or --dry-run)")
        n = await _count_dead(deps, queue, older)
        print(f"purge {n} dead letters of {queue}{which}? [y/N] ", end="", file=sys.stderr)
        sys.stderr.flush()
        answer = await asyncio.to_thread(sys.stdin.readline)
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged", file=sys.stderr)
            return 1
    n = await _count_dead(deps, queue, older, purge=True)
    print(f"purged {n} dead letters of {queue}{which}")
    return 0


async def _replay(deps: Deps, args: argparse.Namespace) -> int:
    if not args.all and not args.dead_ids:
        raise ConfigError("dlq replay needs dead-letter IDs or --all")
    if args.all:
        return await _replay_all(deps, args.queue)
    r, keys = deps.redis, deps.keys
    found = [await _find_dead(deps, args.queue, i) for i in args.dead_ids]
    missing = [i for i, f in zip(args.dead_ids, found, strict=True) if f is None]
    if missing:
        raise ConfigError(f"no dead letter {', '.join(missing)} in {args.queue}")
    cut = [f"{f.dead_id} ({f.cut})" for f in found if f is not None and f.cut is not None]
    if cut:  # checked before any is replayed: all or nothing
        raise PublishError(f"not replayed, the letters no longer hold the whole entry: "
                           f"{'; '.join(cut)}")  # fmt: skip
    gone = []
    for one in found:
        if one is not None:
            entry = await replay_dead(r, deps.pool, keys, one)
            if entry is None:
                gone.append(one.dead_id)
            else:
                print(f"replayed {one.dead_id} as {entry} (job {one.fields.get('job_id')})")
    if gone:
        raise ConfigError(f"dead letter {', '.join(gone)} was replayed or purged meanwhile")
    return 0


async def _replay_all(deps: Deps, queue: str) -> int:
    """Replay the letters present now, oldest first, each once; cut ones stay."""
    progress = Progress(f"replaying dead letters of {queue}", await _count_dead(deps, queue, None))
    replayed, kept = 0, list[str]()
    for part in await _parts(deps, queue):
        done = replayed

        def update(n: int, done: int = done) -> None:
            progress.update(done + n)

        n, left = await replay_all(deps.redis, deps.pool, deps.keys, part, update)
        replayed, kept = replayed + n, kept + left
    progress.finish()
    print(f"replayed {replayed} dead letters of {queue}")
    if kept:
        ids = ", ".join(kept[:10])
        raise PublishError(f"{len(kept)} dead letters of {queue} hold a truncated payload or "
                           f"field and were not replayed: {ids}")  # fmt: skip
    return 0

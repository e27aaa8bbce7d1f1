"""The `jobstream` command line: worker, migrate, publish, status, workers, job, dlq, health,
schema, prune, dashboard, demo, mailbox, webhook, warmup and schedule."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import asyncpg
import redis.exceptions

from jobstream.consumers.cli import (
    commands,
    commands_control,
    commands_mail,
    commands_prune,
    commands_schema,
)
from jobstream.consumers.worker.settings import Settings
from jobstream.otel.logs import escape_controls, setup_logging
from jobstream.otel.redact import remember_secrets, scrub
from jobstream.streams import JobstreamError
from jobstream.streams.loop import run

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        text = escape_controls(f"{self.prog}: {message} (see {self.prog} --help)")
        self.exit(2, f"{text}\n")


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0.1 to 3600, not {text!r}"
        )
    return value


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {text!r}")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("jobstream")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _log_level(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=default,
        help="DEBUG, INFO, WARNING or ERROR (default: JOBSTREAM_LOG_LEVEL, else INFO)",
    )


def _every_command(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser's subcommand parsers, at every depth."""
    found = []
    for action in parser._actions:  # argparse has no public walk over its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_every_command(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobstream", description=__doc__)
    p.add_argument("--version", action="version", version=f"jobstream {_version()}")
    _log_level(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub)
    for child in _every_command(p):  # `jobstream status --log-level DEBUG` works too
        _log_level(child, argparse.SUPPRESS)
    return p


def _add_commands(sub: Any) -> None:

    w = sub.add_parser("worker", help="run a worker replica until SIGTERM/SIGINT")
    w.add_argument("--queues", nargs="+", metavar="Q", help="queues to serve (default: all)")
    w.add_argument("--concurrency", type=_positive, help="jobs in flight per queue")
    w.add_argument("--burst", action="store_true", help="drain the queues, then exit")
    w.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve /metrics on this port")
    w.add_argument(
        "--metrics-host", metavar="HOST", help="address /metrics listens on (default: 127.0.0.1)"
    )
    w.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one object a line"
    )
    w.add_argument(
        "--processes",
        type=_positive,
        metavar="N",
        help="engine processes under one supervisor (default: the usable cores; 1: no supervisor)",
    )
    w.add_argument("--slot", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    w.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)  # its pid, likewise

    sub.add_parser("migrate", help="apply the SQL migrations (idempotent)")

    pub = sub.add_parser("publish", help="validate and publish one job")
    pub.add_argument("queue")
    pub.add_argument("payload", help="the payload as a JSON object")
    pub.add_argument("--id", dest="job_id", help="job id (default: generated)")
    pub.add_argument("--delay", type=float, help="run it after this many seconds")
    pub.add_argument("--key", help="partition key (e.g. a mailbox id): its jobs keep their order")

    st = sub.add_parser("status", help="per-queue stream and job counts")
    st.add_argument("--json", action="store_true", help="one JSON document")
    st.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="print it again every SECONDS (default 2) until interrupted",
    )

    wk = sub.add_parser("workers", help="consumers: live or stale, heartbeat age, jobs held")
    wk.add_argument("--json", action="store_true", help="one JSON document")

    job = sub.add_parser("job", help="one job: its row, executions and hash")
    job.add_argument("job_id")
    job.add_argument("--json", action="store_true")

    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="dlq", required=True)
    dl = dlq.add_parser("list", help="newest dead letters")
    dl.add_argument("queue", nargs="?")
    dl.add_argument("--count", type=_positive, default=20, help="per queue (default 20)")
    dl.add_argument("--json", action="store_true", help="one JSON document, errors whole")
    ds = dlq.add_parser("show", help="one dead letter, all fields")
    ds.add_argument("dead_id")
    ds.add_argument("--queue")
    dr = dlq.add_parser("replay", help="publish dead letters again with attempt 1")
    dr.add_argument("queue")
    dr.add_argument("dead_ids", nargs="*", metavar="ID")
    dr.add_argument("--all", action="store_true")
    dp = dlq.add_parser("purge", help="delete dead letters")
    dp.add_argument("queue")
    dp.add_argument("--older-than", help="only those older than this: 30s, 15m, 12h, 7d")
    dp.add_argument("--yes", action="store_true", help="really delete (else asked at a terminal)")
    dp.add_argument("--dry-run", action="store_true", help="only say how many would go")

    h = sub.add_parser("health", help="exit 0 when Redis, PostgreSQL (and the worker) are alive")
    h.add_argument("--consumer", help="also require this worker's heartbeat")

    commands_schema.add_parser(sub)
    commands_prune.add_parser(sub)

    web = sub.add_parser("dashboard", help="serve the web dashboard (token required)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    web.add_argument("--port", type=_port, default=8080, help="port (default: 8080)")

    d = sub.add_parser("demo", help="start two workers and push real jobs through every queue")
    d.add_argument("--events", type=_positive, default=3000)
    commands_mail.add_parsers(sub)
    commands_control.add_parsers(sub, pub, job)


def _error(text: str) -> None:
    """One line on stderr: scrubbed of secrets, control characters escaped."""
    print(f"jobstream: {escape_controls(scrub(text))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "schema":  # needs no configuration and no server
        return commands_schema.main(args)
    try:
        settings = Settings.from_env()
    except JobstreamError as exc:
        _error(str(exc))
        return 2
    remember_secrets(settings.secrets())
    level = (args.log_level or settings.log_level).upper()
    setup_logging(level, getattr(args, "log_format", "text"))
    try:
        return run(commands.run(args, settings), settings.event_loop)
    except JobstreamError as exc:
        _error(str(exc))
        return 2
    except (OSError, redis.exceptions.RedisError, asyncpg.PostgresError) as exc:
        # A server that is down or refuses us: one line, never a traceback.
        if isinstance(exc, BrokenPipeError):  # output piped into `head` and the like
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        _error(f"{type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's boundary: an operator gets one line, not a traceback
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        _error(f"unexpected {type(exc).__name__}: {exc} (--log-level DEBUG shows where)")
        return 1


if __name__ == "__main__":
    sys.exit(main())

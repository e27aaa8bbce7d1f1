"""`jobstream mailbox|webhook|warmup ...`: manage mailboxes and endpoints, schedule warmup."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from jobstream.consumers.cli.render import Progress, render_json, render_rows
from jobstream.consumers.queues.warmup import publish_day
from jobstream.consumers.store import mailboxes, webhooks
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.settings import redact_url
from jobstream.streams import ConfigError

__all__ = ["COMMANDS", "add_parsers", "run", "schedule_warmup"]

COMMANDS = frozenset({"mailbox", "webhook", "warmup"})


def add_parsers(sub: Any) -> None:
    """Add the `mailbox`, `webhook` and `warmup` subcommands to the CLI's subparsers."""
    mb = sub.add_parser("mailbox", help="platform mailboxes").add_subparsers(
        dest="mailbox", required=True
    )
    add = mb.add_parser("add", help="add a mailbox")
    add.add_argument("address")
    add.add_argument("--id", dest="mailbox_id", help="mailbox id (default: generated)")
    add.add_argument("--name", help="display name")
    add.add_argument(
        "--smtp-url",
        help="its relay, smtp[s]://user:pass@host:port[?starttls]; '-' reads it from stdin "
        "(keeps the password out of the process list); default: SMTP_URL",
    )
    add.add_argument("--daily-limit", type=int, default=500, help="0: no limit")
    add.add_argument("--per-minute-limit", type=int, default=20, help="0: no limit")
    add.add_argument("--warmup", action="store_true", help="warm it up, starting today")
    mb.add_parser("list", help="all mailboxes (relay passwords hidden)").add_argument(
        "--json", action="store_true", help="one JSON document"
    )
    for name, text in (("pause", "stop sending from it"), ("resume", "send from it again")):
        mb.add_parser(name, help=text).add_argument("mailbox_id")
    wu = mb.add_parser("warmup", help="turn a mailbox's warmup on or off")
    wu.add_argument("mailbox_id")
    wu.add_argument("state", choices=["on", "off"])

    wh = sub.add_parser("webhook", help="customer webhook endpoints").add_subparsers(
        dest="webhook", required=True
    )
    wa = wh.add_parser("add", help="register an endpoint; prints its secret once")
    wa.add_argument("url")
    wa.add_argument("--events", nargs="+", metavar="TYPE", help="event types (default: all)")
    wh.add_parser("list", help="all endpoints (secrets never shown)").add_argument(
        "--json", action="store_true", help="one JSON document"
    )
    wh.add_parser("disable", help="stop deliveries to an endpoint").add_argument("endpoint_id")

    warm = sub.add_parser("warmup", help="warmup scheduling").add_subparsers(
        dest="warmup", required=True
    )
    ws = warm.add_parser("schedule", help="publish the day's warmup job of every enabled mailbox")
    ws.add_argument("--day", type=dt.date.fromisoformat, help="YYYY-MM-DD (default: today UTC)")


async def run(args: argparse.Namespace, deps: Deps) -> int | None:
    """Run the command when it is one of ours; None otherwise."""
    if args.command == "mailbox":
        return await _mailbox(args, deps)
    if args.command == "webhook":
        return await _webhook(args, deps)
    if args.command == "warmup":
        ids = await schedule_warmup(deps, args.day, progress=True)
        print(f"published {len(ids)} warmup jobs")
        return 0
    return None


async def schedule_warmup(
    deps: Deps, day: dt.date | None = None, *, progress: bool = False, chunk: int = 500
) -> list[str]:
    """Publish one `warmup` job per enabled mailbox for `day`, `chunk` per round trip
    (`progress`: say how far on stderr); the job ids are per mailbox and day, so a cron
    entry that fires twice plans nothing twice."""
    shown: list[Progress] = []

    def show(done: int, total: int) -> None:
        if not shown:
            shown.append(Progress("publishing warmup jobs", total))
        if done:
            shown[0].update(done)

    published = await publish_day(deps, day, chunk=chunk, progress=show if progress else None)
    for bar in shown:
        bar.finish()
    return published


async def _mailbox(args: argparse.Namespace, deps: Deps) -> int:
    pool = deps.pool
    if args.mailbox == "add":
        url = args.smtp_url
        if url == "-":
            url = sys.stdin.readline().strip() or None
        box = await mailboxes.add_mailbox(
            pool,
            args.address,
            mailbox_id=args.mailbox_id,
            display_name=args.name,
            smtp_url=url,
            daily_limit=args.daily_limit,
            per_minute_limit=args.per_minute_limit,
            warmup=args.warmup,
        )
        print(render_rows([box.public()]))
        return 0
    if args.mailbox == "list":
        boxes = [b.public() for b in await mailboxes.list_mailboxes(pool)]
        print(render_json(boxes) if args.json else render_rows(boxes))
        return 0
    if args.mailbox == "warmup":
        found = await mailboxes.set_warmup(pool, args.mailbox_id, args.state == "on")
    else:
        status = "paused" if args.mailbox == "pause" else "active"
        found = await mailboxes.set_status(pool, args.mailbox_id, status)
    if not found:
        raise ConfigError(f"no mailbox {args.mailbox_id}")
    print(f"mailbox {args.mailbox_id}: {args.mailbox} done")
    return 0


async def _webhook(args: argparse.Namespace, deps: Deps) -> int:
    if args.webhook == "add":
        endpoint_id, secret = await webhooks.add_endpoint(deps.pool, args.url, args.events)
        print(f"endpoint {endpoint_id}")
        print(f"secret   {secret}")
        print("(the secret is shown once: store it now to verify signatures)")
        return 0
    if args.webhook == "list":
        rows = await webhooks.list_endpoints(deps.pool)
        for r in rows:
            r["url"] = redact_url(r["url"])
            if not args.json:
                r["event_types"] = ",".join(r["event_types"])
        print(render_json(rows) if args.json else render_rows(rows))
        return 0
    if not await webhooks.disable_endpoint(deps.pool, args.endpoint_id, "disabled by an operator"):
        raise ConfigError(f"no active webhook endpoint {args.endpoint_id}")
    print(f"endpoint {args.endpoint_id} disabled")
    return 0

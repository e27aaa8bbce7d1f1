"""Hostile mail through the real handlers in a real worker: no message freezes the worker.

Crafted messages (bench/adversarial.py) go through `email:processing` and `bounce` while
canary jobs run on another queue; each crafted job ends with a clear outcome, and the
canaries complete while a slow parse is still running. A parse past its job's timeout
has its process killed.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import msgspec

from bench.adversarial import CRAFTED
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import ProcessBounce, ProcessEmail
from jobstream.streams import Publisher
from tests import handlers
from tests.helpers import alive, eventually, running

QUEUES = ["email:processing", "bounce", "analytics"]
NOTICE_SUBJECT = "Undelivered Mail Returned to Sender"
# Not a bounce (so only email:processing reads it), and seconds of parsing.
SLOW = CRAFTED["sibling_parts"](40).replace(b"MAILER-DAEMON", b"someone", 1)
SLOW = SLOW.replace(NOTICE_SUBJECT.encode(), b"Many parts", 1)
TERMINAL = ("completed", "failed")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def status(deps: Deps, job_id: str) -> str | None:
    value: str | None = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    return value


async def finished(deps: Deps, job_ids: list[str], timeout_s: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rows = await deps.pool.fetch(
            "SELECT id, status, result, error FROM jobs WHERE id = ANY($1) AND status = ANY($2)",
            job_ids,
            list(TERMINAL),
        )
        return {r["id"]: r for r in rows} if len(rows) == len(job_ids) else None

    rows: dict[str, Any] = await eventually(check, timeout_s=timeout_s)
    return rows


async def canary_latency(deps: Deps, publisher: Publisher, n: int) -> float:
    """Publish one canary job and return the seconds until PostgreSQL shows it completed."""
    started = time.monotonic()
    job_id = await publisher.publish(handlers.QUEUE, handlers.Work(), f"canary-{n}")

    async def done() -> bool:
        return await status(deps, job_id) == "completed"

    await eventually(done, timeout_s=60, interval_s=0.01)
    return time.monotonic() - started


async def test_crafted_mail_ends_cleanly_and_never_stalls_other_queues(deps: Deps) -> None:
    publisher = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    engine = make_engine(deps, [*QUEUES, handlers.QUEUE], handlers=(*HANDLERS, *handlers.SPECS))
    async with running(engine):
        slow_id = await deps.publisher.publish(
            "email:processing", ProcessEmail(mailbox_id="mb-slow", raw_b64=b64(SLOW)), "slow"
        )

        async def slow_parsing() -> bool:
            return bool(deps.parser.busy_pids) and await status(deps, slow_id) == "running"

        await eventually(slow_parsing, timeout_s=30)
        crafted: list[str] = []
        for kind, build in CRAFTED.items():
            raw = b64(build(1))
            crafted.append(
                await deps.publisher.publish(
                    "email:processing", ProcessEmail(mailbox_id=f"mb-{kind}", raw_b64=raw), kind
                )
            )
            crafted.append(
                await deps.publisher.publish(
                    "bounce", ProcessBounce(raw_b64=raw, mailbox_id=f"mb-{kind}"), f"b-{kind}"
                )
            )
        latencies = []
        for n in range(5):
            latencies.append(await canary_latency(deps, publisher, n))
            # the canary went through while the slow message was still being parsed
            assert await status(deps, slow_id) not in TERMINAL
        rows = await finished(deps, [slow_id, *crafted], timeout_s=120)
    slow_s = (
        await deps.pool.fetchval(
            "SELECT duration_ms FROM job_executions WHERE job_id = $1", slow_id
        )
        / 1000
    )
    assert rows[slow_id]["status"] == "completed"
    assert max(latencies) < slow_s / 4, (latencies, slow_s)
    for job_id in crafted:
        assert rows[job_id]["status"] == "completed", (job_id, rows[job_id]["error"])
    stored = await deps.pool.fetch("SELECT mailbox_id, subject, defects FROM inbound_messages")
    by_mailbox = {r["mailbox_id"]: r for r in stored}
    for kind in CRAFTED:
        if kind != "aol_sentences":  # the only one not from the common notice
            assert by_mailbox[f"mb-{kind}"]["subject"] == NOTICE_SUBJECT, kind
        assert json.loads(rows[f"b-{kind}"]["result"])["is_bounce"] is True, kind
    for kind in ("multipart_nesting", "rfc822_nesting"):
        defects = by_mailbox[f"mb-{kind}"]["defects"]
        assert "MIME nesting deeper than 32 levels: inner parts not read" in defects


async def test_a_parse_past_its_timeout_is_killed(settings: Settings, prefix: str) -> None:
    policies = msgspec.json.encode({"email:processing": {"timeout_s": 1, "max_attempts": 1}})
    settings = msgspec.structs.replace(settings, policies=policies.decode(), parse_processes=1)
    async with connect(settings) as deps:
        await deps.parser.parse_message(b"Subject: warm\n\nx\n")  # the child is ready
        (pid,) = deps.parser.pids
        async with running(make_engine(deps, QUEUES)):
            job_id = await deps.publisher.publish(
                "email:processing", ProcessEmail(mailbox_id="mb-1", raw_b64=b64(SLOW)), "slow"
            )

            async def parsing() -> bool:
                return deps.parser.busy_pids == [pid]

            await eventually(parsing, timeout_s=30)
            rows = await finished(deps, [job_id], timeout_s=30)
        assert rows[job_id]["status"] == "failed"
        assert "handler exceeded its 1s timeout" in rows[job_id]["error"]

        async def gone() -> bool:
            return not alive(pid)

        await eventually(gone, timeout_s=5)  # the parse stopped: no CPU burnt for nobody
        assert pid not in deps.parser.pids
        parsed = await deps.parser.parse_message(CRAFTED["rfc822_nesting"](1))
        assert parsed.subject == NOTICE_SUBJECT  # from a fresh parser process
        assert deps.parser.pids != [pid]
        keys = [k async for k in deps.redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await deps.redis.delete(*keys)

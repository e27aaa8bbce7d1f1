"""The helpers tests share (no test module imports another): polling, engines, subprocesses,
in-memory tracing, test queues, sample payloads, checks of parsed mail.

The tracer provider is one for the whole session, installed globally only per test: the global
provider can be set once per process, and the module-level proxy tracers cache the first real
tracer they see, so the same provider is installed again each time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from jobstream import otel
from jobstream.consumers.mail.inbound import ParsedMessage, classify
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import AnalyticsEvent, WebhookDelivery
from jobstream.streams import Job, Policy, Publisher, RetryableError
from tests import handlers

ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def event(event_id: str, type_: str = "open", mailbox: str = "mb-1", **kw: Any) -> AnalyticsEvent:
    return AnalyticsEvent(
        event_id=event_id,
        type=type_,  # type: ignore[arg-type]
        mailbox_id=mailbox,
        occurred_at=kw.pop("occurred_at", dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)),
        **kw,
    )


async def run(
    *args: str, env: dict[str, str] | None = None, limit_s: float = 90, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command without blocking the event loop; return its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
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
    return await run(
        sys.executable, "-m", "jobstream.consumers.cli", *args, env=env, limit_s=limit_s
    )


async def eventually(
    predicate: Callable[[], Awaitable[Any]], timeout_s: float = 15.0, interval_s: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last value: {last!r})")


@contextlib.asynccontextmanager
async def running(engine: Any) -> AsyncIterator[Any]:
    """Run an engine in the background for the block, then stop and drain it."""
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        engine.stop()
        await asyncio.wait_for(task, 30)


EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider(resource=Resource({"service.name": "jobstream-test"}))
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


def reset_global_provider() -> None:
    """Forget the global tracer provider (what the SDK's own test utilities do)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@contextlib.contextmanager
def in_memory_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the block, spans kept in memory; off again after."""
    reset_global_provider()
    trace.set_tracer_provider(PROVIDER)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        EXPORTER.clear()
        reset_global_provider()


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def statuses(deps: Deps, ids: list[str]) -> dict[str, str]:
    rows = await deps.pool.fetch("SELECT id, status FROM jobs WHERE id = ANY($1)", ids)
    return {r["id"]: r["status"] for r in rows}


async def all_terminal(deps: Deps, ids: list[str]) -> bool:
    got = await statuses(deps, ids)
    return len(got) == len(ids) and all(s in ("completed", "failed") for s in got.values())


async def executions(deps: Deps) -> dict[str, int]:
    raw = await deps.redis.hgetall(handlers.executions_key(deps))
    return {k.decode(): int(v) for k, v in raw.items()}


def served(*specs: HandlerSpec[Any]) -> tuple[HandlerSpec[Any], ...]:
    """The built-in handlers with `specs` in place of those of the same queue, or added."""
    by = {spec.queue: spec for spec in HANDLERS}
    return tuple({**by, **{spec.queue: spec for spec in specs}}.values())


def engine(deps: Deps, **kw):
    return make_engine(deps, None, kw.pop("concurrency", None), handlers=handlers.SPECS, **kw)


OUTBOUND_SQL = """
INSERT INTO outbound_messages (message_id, job_id, mailbox_id, recipients, campaign_id,
                               is_warmup, status, sent_at)
VALUES ($1, $2, $3, $4, $5, $6, 'sent', $7)
"""


async def finished(deps: Deps, *job_ids: str) -> list[Any]:
    """Wait until every job has a terminal status; return their rows in order."""

    async def check() -> list[Any] | None:
        rows = await deps.pool.fetch(
            "SELECT id, status, result, error FROM jobs"
            " WHERE id = ANY($1) AND status IN ('completed', 'failed')",
            list(job_ids),
        )
        if len(rows) < len(job_ids):
            return None
        by_id = {r["id"]: r for r in rows}
        return [by_id[i] for i in job_ids]

    rows: list[Any] = await eventually(check, timeout_s=30)
    return rows


def result(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(row["result"])
    return out


async def add_outbound(
    deps: Deps, message_id: str, mailbox: str, *, warmup: bool = False, day: int = 1
) -> None:
    sent = dt.datetime(2026, 3, day, 9, 0, tzinfo=dt.UTC)
    await deps.pool.execute(
        OUTBOUND_SQL, message_id, f"send-{message_id}", mailbox, ["x@example.net"], "cmp-1",
        warmup, sent,
    )  # fmt: skip


XFAIL = {
    "bounces/yale_01.txt": (
        "the notice names the recipient only as the bare local name 'userx'; the expected "
        "pair userx@yale.edu / userx@cs.yale.edu comes from a Yale-only rule of the source "
        "package, not from anything the message states"
    ),
}


def alive(pid: int) -> bool:
    """Whether `pid` is a process that still runs (a reaped or zombie one does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


QUEUE = "otel-test"


step_log = logging.getLogger("tests.otel_step")


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """What the traced test handler does: fail the first N attempts, publish an event."""

    fail_times: int = 0
    fan_out: str | None = None  # publish an analytics event with this id


@handler(QUEUE, Step, Policy(max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1))
async def traced_step(step: Step, job: Job, deps: Deps) -> dict[str, int]:
    with otel.span("step", {"test.attempt": job.attempt}):
        step_log.info("step of job %s", job.id)
        if job.attempt <= step.fail_times:
            raise RetryableError(f"transient failure on attempt {job.attempt}")
    if step.fan_out:
        await deps.publisher.publish("analytics", event(step.fan_out), f"job-{step.fan_out}")
    return {"attempt": job.attempt}


def completed(deps: Deps, *job_ids: str) -> Callable[[], Any]:
    async def check() -> bool:
        n = await deps.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::text[]) AND status = 'completed'",
            list(job_ids),
        )
        return bool(n == len(job_ids))

    return check


SLOW_Q = "test-slow"


@handler(SLOW_Q, handlers.Work, Policy(max_attempts=2, timeout_s=0.3, backoff_base_s=0.01))
async def slow(w: handlers.Work, job: Job, deps: Deps) -> None:
    """Sleeps as asked under a 0.3 s timeout."""
    await deps.redis.hincrby(handlers.executions_key(deps), job.id, 1)
    await asyncio.sleep(w.sleep_s)


CLASSES = {"bounce", "auto_reply", "warmup", "reply", "other"}


def assert_sound(msg: ParsedMessage) -> None:
    """A result the handler can store: the right type, encodable to JSON (no lone surrogates)."""
    assert isinstance(msg, ParsedMessage)
    assert msgspec.json.decode(msgspec.json.encode(msg), type=ParsedMessage) == msg
    assert msg.date is None or msg.date.tzinfo is UTC
    assert classify(msg, set()) in CLASSES


WHEN = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)


def job(job_id: str = "wh-job", attempt: int = 1) -> Job:
    return Job(job_id, "webhook", attempt, "0-1", int(time.time() * 1000))


def delivery(endpoint_id: str, message_id: str = "msg_1") -> WebhookDelivery:
    return WebhookDelivery(
        endpoint_id=endpoint_id,
        message_id=message_id,
        event_type="email.sent",
        timestamp=WHEN,
        data={"message_id": "m-1@example.com", "recipients": ["r@example.net"]},
    )


def work_publisher(deps: Deps) -> Publisher:
    """A publisher of the test queue (`tests.handlers`)."""
    return Publisher(deps.redis, deps.keys, handlers.PAYLOADS)


def quick_settings(
    redis_url: str, redis_cluster: bool, database: str, prefix: str, **changes: Any
) -> Settings:
    """A test worker's settings: its Redis and database, its own key prefix, and quick
    timings (blocking reads, reclaims, liveness, shutdown) so that tests do not wait."""
    return Settings(
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        database_url=database,
        stream_prefix=f"{prefix}jobs:",
        job_prefix=f"{prefix}job:",
        block_ms=100,
        reclaim_interval_s=0.5,
        alive_ttl_ms=1500,
        shutdown_grace_s=5,
        pg_pool_size=10,
        **changes,
    )


def with_settings(deps: Deps, **settings: Any) -> Deps:
    """The same connections under changed settings (another consumer name, say)."""
    return dataclasses.replace(deps, settings=msgspec.structs.replace(deps.settings, **settings))


def leaf_commands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, Any]:
    """Every leaf command of a parser by its words (`worker`, `dlq list`, `mailbox add` ...)."""
    out: dict[str, Any] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out |= leaf_commands(child, f"{path}{name} ") or {f"{path}{name}": child}
    return out


def entry_seconds(entry_id: Any) -> float:
    """An entry ID's time in epoch seconds, as the recorder stores a job's `created_at`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.partition("-")[0]) / 1000.0

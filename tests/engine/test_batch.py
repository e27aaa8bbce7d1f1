"""Batch handlers: many jobs in one call, everything else per job (rows, executions,
retries, dead letters, spans), one job's failure never failing the others; and the
`analytics` batch counting each event exactly once across batches, replicas and a SIGKILL
(inv. 1, 3, 5, 10)."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import signal
import sys
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import Publisher
from jobstream.streams import semconv as sc
from tests import batch_handlers as bh
from tests.helpers import all_terminal, event, eventually, in_memory_spans, running

Q = bh.QUEUE
Part = bh.Part


def publisher(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**PAYLOADS, **bh.PAYLOADS})


def engine(deps: Deps) -> Any:
    return make_engine(deps, None, None, handlers=bh.SPECS)


async def rows(deps: Deps, ids: list[str]) -> dict[str, Any]:
    got = await deps.pool.fetch("SELECT * FROM jobs WHERE id = ANY($1)", ids)
    return {r["id"]: r for r in got}


async def batches(deps: Deps) -> list[list[str]]:
    return [msgspec.json.decode(b) for b in await deps.redis.lrange(bh.batches_key(deps), 0, -1)]


async def runs(deps: Deps) -> dict[str, int]:
    raw = await deps.redis.hgetall(bh.runs_key(deps))
    return {k.decode(): int(v) for k, v in raw.items()}


async def settled(deps: Deps, ids: list[str]) -> bool:
    if not await all_terminal(deps, ids):  # (the group may not exist yet)
        return False
    return bool((await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"] == 0)


async def test_one_call_runs_a_batch_and_every_job_is_settled_on_its_own(deps: Deps):
    pub = publisher(deps)
    ok = await pub.publish_many(Q, [Part() for _ in range(40)])
    refused = await pub.publish(Q, Part(permanent=True))
    flaky = await pub.publish(Q, Part(retry_times=1))
    await deps.redis.xadd(deps.keys.stream(Q), {"id": "bad", "payload": "{nope"})
    everything = [*ok, refused, flaky, "bad"]
    async with running(engine(deps)):
        await eventually(lambda: settled(deps, everything))
    seen = await batches(deps)
    assert max(len(b) for b in seen) == 10  # batch_size
    assert all(1 <= len(b) <= 10 for b in seen)
    assert "bad" not in {i for b in seen for i in b}  # an undecodable entry never runs
    got = await rows(deps, everything)
    for job_id in ok:
        row = got[job_id]
        assert row["status"] == "completed"
        assert msgspec.json.decode(row["result"])["attempt"] == 1
        assert await deps.redis.hget(deps.keys.job(job_id), "status") == b"completed"
    assert got[refused]["status"] == "failed"
    assert "refused for good" in got[refused]["error"]
    assert got[flaky]["status"] == "completed"
    assert got[flaky]["attempts"] == 2
    assert got["bad"]["status"] == "failed"
    assert "not JSON" in got["bad"]["error"]
    dead = {f[b"job_id"].decode(): f for _, f in await deps.redis.xrange(deps.keys.dead(Q))}
    assert set(dead) == {refused, "bad"}
    assert dead[refused][b"reason"] == b"permanent"
    assert dead["bad"][b"reason"] == b"invalid"
    execs = await deps.pool.fetch(
        "SELECT job_id, attempt, outcome FROM job_executions ORDER BY job_id, attempt"
    )
    by_job = collections.defaultdict(list)
    for e in execs:
        by_job[e["job_id"]].append((e["attempt"], e["outcome"]))
    assert all(by_job[i] == [(1, "completed")] for i in ok)
    assert by_job[refused] == [(1, "failed")]
    assert by_job[flaky] == [(1, "retrying"), (2, "completed")]
    assert "bad" not in by_job  # never executed
    assert await runs(deps) == {**{i: 1 for i in ok}, refused: 1, flaky: 2}


async def test_a_failing_batch_runs_its_jobs_alone_and_only_the_guilty_fail(deps: Deps):
    pub = publisher(deps)
    ok = await pub.publish_many(Q, [Part() for _ in range(27)])
    poison = await pub.publish(Q, Part(poison=True))
    short = await pub.publish(Q, Part(short=True))
    everything = [*ok, poison, short]
    async with running(engine(deps)):
        await eventually(lambda: settled(deps, everything))
    got = await rows(deps, everything)
    assert {got[i]["status"] for i in ok} == {"completed"}
    assert got[poison]["status"] == "failed"
    assert "poisoned batch" in got[poison]["error"]
    assert got[short]["status"] == "failed"
    assert "returned 0 outcomes for 1 job" in got[short]["error"]
    seen = await batches(deps)
    assert [poison] in seen  # it ran alone after its batch failed
    assert [short] in seen
    counts = await runs(deps)
    # The jobs that shared a batch with either ran twice: in the batch, then alone.
    shared = {i for b in seen if len(b) > 1 and (poison in b or short in b) for i in b}
    assert shared - {poison, short}
    assert all(counts[i] == 2 for i in shared)
    assert all(counts[i] == 1 for i in set(ok) - shared)
    execs = await deps.pool.fetchval("SELECT count(*) FROM job_executions")
    assert execs == len(everything)  # one attempt each: the batch's failure is no attempt


async def test_a_batch_past_its_timeout_leaves_only_the_slow_job_timing_out(deps: Deps):
    pub = publisher(deps)
    ok = await pub.publish_many(Q, [Part() for _ in range(9)])
    slow = await pub.publish(Q, Part(hang=True))
    async with running(engine(deps)):
        await eventually(lambda: settled(deps, [*ok, slow]), timeout_s=30)
    got = await rows(deps, [*ok, slow])
    assert {got[i]["status"] for i in ok} == {"completed"}
    assert got[slow]["status"] == "failed"
    assert got[slow]["attempts"] == 2  # timeouts are retried, then exhausted
    assert "exceeded its 1s timeout" in got[slow]["error"]
    letter = (await deps.redis.xrange(deps.keys.dead(Q)))[0][1]
    assert letter[b"reason"] == b"exhausted"


async def test_a_batch_is_one_span_linked_to_each_jobs_producer(deps: Deps):
    with in_memory_spans() as spans:
        tracer = trace.get_tracer("tests")
        pub = publisher(deps)
        with tracer.start_as_current_span("request") as request:
            ids = await pub.publish_many(Q, [Part() for _ in range(4)])
            refused = await pub.publish(Q, Part(permanent=True))
        ids.append(refused)
        eng = engine(deps)
        async with running(eng):
            await eventually(lambda: settled(deps, ids))
        finished = spans.get_finished_spans()
    stream = deps.keys.stream(Q)
    process = [s for s in finished if s.name == f"process {stream}"]
    assert len(process) == 1, [dict(s.attributes or {}) for s in process]
    span = process[0]
    attrs = dict(span.attributes or {})
    assert attrs == {
        **eng._attrs[Q],  # the queue's own, as every job's span has them
        sc.BATCH_MESSAGE_COUNT: 5,
        sc.ERROR_TYPE: "PermanentError",
    }
    sends = {s.context.span_id: s for s in finished if s.name == f"send {stream}"}
    assert len(span.links) == 5
    linked = {}
    for link in span.links:
        la = dict(link.attributes or {})
        assert link.context.trace_id == request.get_span_context().trace_id
        assert link.context.span_id in sends  # each job's own producer span
        assert la[sc.JOB_ATTEMPT] == 1
        assert la[sc.DELIVERY_COUNT] == 1
        linked[la[sc.CONVERSATION_ID]] = la[sc.MESSAGE_ID]
    entries = await deps.pool.fetch("SELECT id, stream_entry_id FROM jobs")
    assert linked == {r["id"]: r["stream_entry_id"] for r in entries}
    assert span.status.status_code is StatusCode.ERROR
    [dead] = [e for e in span.events if e.name == "dead-lettered"]
    assert dead.attributes is not None
    assert dead.attributes["messaging.message.conversation_id"] == refused
    assert dead.attributes["error.type"] == "PermanentError"
    assert dead.attributes["jobstream.reason"] == "permanent"


async def test_a_batch_of_one_is_traced_as_a_single_job(deps: Deps):
    exporter: InMemorySpanExporter
    with in_memory_spans() as exporter:
        job_id = await publisher(deps).publish(Q, Part())
        async with running(engine(deps)):
            await eventually(lambda: settled(deps, [job_id]))
        [span] = [s for s in exporter.get_finished_spans() if s.name.startswith("process")]
    attrs = dict(span.attributes or {})
    assert attrs["messaging.message.conversation_id"] == job_id
    assert "messaging.batch.message_count" not in attrs


# ---- analytics: one statement per batch, exactly once ------------------------------------

N_UNIQUE = 6000
DAY = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC)


def analytics_events() -> list[Any]:
    """Every event once, then a third of them again: some right after themselves (one
    batch), some thousands of entries later (another batch, maybe another replica)."""
    out = []
    for i in range(N_UNIQUE):
        e = event(
            f"ev-{i}", ["open", "click", "sent"][i % 3], f"mb-{i % 5}",
            occurred_at=DAY + dt.timedelta(minutes=i % 3),  # two UTC days
            campaign_id=f"c-{i % 4}" if i % 2 else None,
        )  # fmt: skip
        out.append(e)
        if i % 6 == 0:
            out.append(e)  # within one batch
    out += [out[i] for i in range(0, len(out), 4)]  # across batches
    return out


async def spawn_worker(env: dict[str, str], name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobstream.consumers.cli", "worker", "--processes", "1",
        "--queues", "analytics",
        env={**env, "JOBSTREAM_CONSUMER_NAME": name},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def frozen_holding(
    deps: Deps, proc: asyncio.subprocess.Process, stream: str, consumer: str
) -> int:
    """Freeze `proc` (SIGSTOP) at a moment its consumer holds entries, and say how many;
    0 (and let it go on) when it holds none."""
    proc.send_signal(signal.SIGSTOP)
    held = await deps.redis.xpending_range(stream, "workers", "-", "+", 10_000, consumer)
    if not held:
        proc.send_signal(signal.SIGCONT)
    return len(held)


async def test_analytics_counts_once_across_batches_replicas_and_a_sigkill(deps: Deps, env_for):
    events = analytics_events()
    stream = deps.keys.stream("analytics")
    pub = Publisher(deps.redis, deps.keys, PAYLOADS, record_queued=False)
    ids: list[str] = []
    for i in range(0, len(events), 1000):
        ids += await pub.publish_many("analytics", events[i : i + 1000])
    env = env_for(JOBSTREAM_LOG_LEVEL="WARNING")
    a = await spawn_worker(env, "batch-a")
    b = await spawn_worker(env, "batch-b")
    held_at_kill = 0
    try:

        async def both_working() -> bool:
            done = await deps.pool.fetch(
                "SELECT worker_id, count(*) AS n FROM jobs WHERE status = 'completed' GROUP BY 1"
            )
            return len(done) == 2 and min(r["n"] for r in done) >= 200

        await eventually(both_working, timeout_s=60, interval_s=0.02)
        held_at_kill = await eventually(
            lambda: frozen_holding(deps, a, stream, "batch-a"), timeout_s=60, interval_s=0.01
        )
        a.kill()  # mid-batch: no drain, no records, no acks
        await a.wait()

        async def all_done() -> bool:
            pending = await deps.redis.xpending(stream, "workers")
            return await all_terminal(deps, ids) and pending["pending"] == 0

        await eventually(all_done, timeout_s=120, interval_s=0.2)
    finally:
        for p in (a, b):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in (a, b):
            await p.wait()
    assert held_at_kill > 0  # it died holding entries, which the other replica took over
    unique = {e.event_id: e for e in events}
    assert len(events) > len(unique)
    assert await deps.pool.fetchval("SELECT count(*) FROM analytics_events") == len(unique)
    by_mailbox: collections.Counter[tuple[dt.date, str, str]] = collections.Counter()
    by_campaign: collections.Counter[tuple[dt.date, str, str]] = collections.Counter()
    for e in unique.values():
        day = e.occurred_at.astimezone(dt.UTC).date()
        by_mailbox[(day, e.mailbox_id, e.type)] += 1
        if e.campaign_id is not None:
            by_campaign[(day, e.campaign_id, e.type)] += 1
    got = await deps.pool.fetch("SELECT day, mailbox_id, type, count FROM analytics_daily_mailbox")
    assert {(r["day"], r["mailbox_id"], r["type"]): r["count"] for r in got} == by_mailbox
    got = await deps.pool.fetch(
        "SELECT day, campaign_id, type, count FROM analytics_daily_campaign"
    )
    assert {(r["day"], r["campaign_id"], r["type"]): r["count"] for r in got} == by_campaign
    statuses = await deps.pool.fetch("SELECT status, result FROM jobs WHERE queue = 'analytics'")
    assert len(statuses) == len(ids)
    assert {r["status"] for r in statuses} == {"completed"}
    recorded = sum(msgspec.json.decode(r["result"])["recorded"] for r in statuses)
    # Exactly once per event, but a job whose batch committed before the SIGKILL ran again
    # and found its event stored (recorded false).
    assert len(unique) - held_at_kill <= recorded <= len(unique)
    workers = await deps.pool.fetch("SELECT DISTINCT worker_id FROM jobs")
    assert {r["worker_id"] for r in workers} == {"batch-a", "batch-b"}

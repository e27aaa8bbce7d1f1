"""What the dashboard reads and does: keyset pages that an index serves, jobs' trace ids,
job details with their trace link, dead-letter replay and purge, workers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import json
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobstream.consumers.dashboard import queries as q
from jobstream.consumers.dashboard.workers import workers_page
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.otel.redact import remember_secrets
from jobstream.streams import Engine
from tests import handlers
from tests.helpers import eventually, in_memory_spans, running

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
QUEUES = ["analytics", "bounce", "email-sending", "email:processing", "warmup", "webhook"]


def _engine(deps: Deps) -> Engine:
    return make_engine(deps, handlers=handlers.SPECS)


async def _status(deps: Deps, job_id: str, status: str) -> bool:
    got = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    return bool(got == status)


async def _until(deps: Deps, job_id: str, status: str) -> None:
    await eventually(functools.partial(_status, deps, job_id, status))


async def _fill(deps: Deps, n: int, same_time: bool = False) -> None:
    """`n` rows over the six queues and five statuses, made by SQL."""
    await deps.pool.execute(
        """
        INSERT INTO jobs (id, queue, status, attempts, created_at, updated_at)
        SELECT 'job-' || i, ($2::text[])[1 + i % 6],
               (ARRAY['completed', 'completed', 'completed', 'failed', 'retrying',
                      'queued'])[1 + (i / 6) % 6],
               1,
               CASE WHEN $3 THEN timestamptz '2026-12-01'
                    ELSE timestamptz '2026-01-01' + i * interval '1 second' END,
               now()
        FROM generate_series(1, $1) AS i
        """,
        n,
        QUEUES,
        same_time,
    )
    await deps.pool.execute("ANALYZE jobs")


async def test_jobs_page_is_newest_first_and_pages_cover_every_row_once(deps: Deps):
    await _fill(deps, 600, same_time=True)  # equal times: the id breaks the tie
    seen: list[str] = []
    before = None
    while True:
        page = await q.jobs_page(deps, before=before, limit=70)
        seen += [j.id for j in page.jobs]
        if page.next is None:
            break
        before = page.next
    assert len(seen) == 600
    assert len(set(seen)) == 600
    assert seen == sorted(seen, reverse=True)  # same created_at: id descending

    failed = await q.jobs_page(deps, queue="bounce", status="failed", limit=5)
    assert [j.status for j in failed.jobs] == ["failed"] * 5
    assert {j.queue for j in failed.jobs} == {"bounce"}
    assert (await q.jobs_page(deps, job_id="job-7")).jobs[0].queue == "bounce"
    assert (await q.jobs_page(deps, job_id="job-7", status="failed")).jobs == []
    assert (await q.jobs_page(deps, job_id="a\x00b")).jobs == []  # names no job
    assert (await q.jobs_page(deps, queue="no\x00pe")).jobs == []


async def test_jobs_page_refuses_what_it_cannot_answer(deps: Deps):
    for kwargs, text in [
        ({"status": "lost"}, "unknown status"),
        ({"before": "yesterday"}, "invalid cursor"),
        ({"before": "9999999999999999999~x"}, "invalid cursor"),
        ({"limit": 0}, "limit"),
    ]:
        with pytest.raises(q.ListError, match=text):
            await q.jobs_page(deps, **kwargs)  # type: ignore[arg-type]


# The partitions of a partitioned table or index (none when it is not partitioned).
PARTS_SQL = """
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relname = $1
"""


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


@pytest.mark.parametrize("generic", [False, True])
async def test_every_jobs_page_is_served_by_an_index(deps: Deps, generic: bool):
    """On 200,000 rows: each page reads at most `limit + 1` rows of each queue, from an
    index, backwards; never a sequential scan or a sort of the table."""
    await _fill(deps, 200_000)
    page = await q.jobs_page(deps, limit=50)
    at, after = q._parse_cursor(page.next or "")
    cases = [
        (q.JOBS_PAGE_SQL, [QUEUES, q._NEWEST, "", 51], "jobs_queue_created_idx"),
        (q.JOBS_PAGE_SQL, [["webhook"], at, after, 51], "jobs_queue_created_idx"),
        (q.JOBS_PAGE_BY_STATUS_SQL, [QUEUES, at, after, 51, "failed"],
         "jobs_queue_status_created_idx"),
        (q.JOBS_PAGE_BY_STATUS_SQL, [["bounce"], q._NEWEST, "", 51, "failed"],
         "jobs_queue_status_created_idx"),
    ]  # fmt: skip
    async with deps.pool.acquire() as conn:
        if generic:  # what a prepared statement may switch to after a few runs
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        parts = {r[0] for r in await conn.fetch(PARTS_SQL, "jobs")}
        for sql, args, index in cases:
            n_queues = len(args[0])  # type: ignore[arg-type]
            own = {r[0] for r in await conn.fetch(PARTS_SQL, index)} | {index}
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            nodes = _nodes(json.loads(raw)[0]["Plan"])
            on_jobs = [n for n in nodes if n.get("Relation Name") in parts | {"jobs"}]
            assert on_jobs, nodes
            for n in on_jobs:  # each partition of `jobs` (time partitions, default)
                assert n["Node Type"] in ("Index Scan", "Index Only Scan"), n["Node Type"]
                assert n["Index Name"] in own, (n["Index Name"], own)
                assert n["Scan Direction"] == "Backward"
                assert n["Actual Rows"] * n["Actual Loops"] <= 51 * n_queues
            assert not any(n["Node Type"] == "Seq Scan" for n in nodes)
            assert not any(n["Node Type"] == "Sort" and "jobs" in json.dumps(n.get("Plans", []))
                           and n.get("Actual Rows", 0) > 51 * n_queues for n in nodes)  # fmt: skip
        queues = [r["queue"] for r in await conn.fetch(q.JOB_QUEUES_SQL)]
        assert queues == sorted(QUEUES)


async def test_a_jobs_trace_id_is_recorded_from_its_traceparent(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    await deps.redis.xadd(stream, {"id": "traced", "payload": "{}", "traceparent": TRACEPARENT})
    await deps.redis.xadd(stream, {"id": "plain", "payload": "{}"})
    await deps.redis.xadd(stream, {"id": "bad", "payload": "not json", "traceparent": TRACEPARENT})
    async with running(_engine(deps)):
        await _until(deps, "bad", "failed")
        await _until(deps, "plain", "completed")
        await _until(deps, "traced", "completed")
    rows = {r["id"]: r["trace_id"] for r in await deps.pool.fetch("SELECT id, trace_id FROM jobs")}
    assert rows == {"traced": TRACE, "plain": None, "bad": TRACE}


async def test_a_traced_jobs_trace_id_is_its_spans_also_when_invalid(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    with in_memory_spans() as exporter:
        assert isinstance(exporter, InMemorySpanExporter)
        await deps.redis.xadd(stream, {"id": "new-trace", "payload": "{}"})
        await deps.redis.xadd(stream, {"id": "invalid", "payload": "[1]"})
        await deps.redis.xadd(stream, {"id": "child", "payload": "{}", "traceparent": TRACEPARENT})
        async with running(_engine(deps)):
            for job_id in ("new-trace", "child"):
                await _until(deps, job_id, "completed")
            await _until(deps, "invalid", "failed")
        spans = {
            s.attributes["messaging.message.conversation_id"]: s
            for s in exporter.get_finished_spans()
            if s.name.startswith("process ")
        }
    rows = {r["id"]: r["trace_id"] for r in await deps.pool.fetch("SELECT id, trace_id FROM jobs")}
    for job_id in ("new-trace", "invalid"):
        assert rows[job_id] == format(spans[job_id].context.trace_id, "032x")
    assert rows["child"] == TRACE
    assert len({rows["new-trace"], rows["invalid"], TRACE}) == 3


async def test_job_detail_links_its_trace_and_scrubs_secrets(deps: Deps):
    remember_secrets(["hunter2-dash-secret"])  # as a relay password would be
    stream = deps.keys.stream(handlers.QUEUE)
    payload = {"permanent": True, "result_text": "pw hunter2-dash-secret"}
    await deps.redis.xadd(stream, {"id": "j1", "payload": json.dumps(payload),
                                   "traceparent": TRACEPARENT})  # fmt: skip
    async with running(_engine(deps)):
        await _until(deps, "j1", "failed")
    plain = await q.job_detail(deps, "j1")
    assert plain is not None
    assert plain.job is not None
    assert plain.trace_id == TRACE
    assert plain.trace_url is None  # JOBSTREAM_TRACE_URL unset
    assert plain.job.payload == {"permanent": True, "result_text": "pw ***"}
    assert b"hunter2" not in msgspec.json.encode(plain)
    assert [e.outcome for e in plain.executions] == ["failed"]
    assert plain.hash["status"] == "failed"
    template = "http://j:16686/trace/{trace_id}"
    settings = msgspec.structs.replace(deps.settings, trace_url=template)
    detail = await q.job_detail(dataclasses.replace(deps, settings=settings), "j1")
    assert detail is not None
    assert detail.trace_url == f"http://j:16686/trace/{TRACE}"
    assert await q.job_detail(deps, "never-seen") is None


async def test_replay_and_purge_from_the_dashboard(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    for i in range(3):
        await deps.redis.xadd(stream, {"id": f"p{i}", "payload": json.dumps({"permanent": True})})
    async with running(_engine(deps)):
        for i in range(3):
            await _until(deps, f"p{i}", "failed")
    page = await q.dead_page(deps, handlers.QUEUE, limit=2)
    assert page.next is not None
    rest = await q.dead_page(deps, handlers.QUEUE, before=page.next, limit=2)
    assert rest.next is None
    letters = page.letters + rest.letters
    assert sorted(d.job_id or "" for d in letters) == ["p0", "p1", "p2"]
    ids = [d.dead_id for d in letters]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))), reverse=True)
    assert {c.queue: c.count for c in page.queues}[handlers.QUEUE] == 3

    one, job = page.letters[0].dead_id, page.letters[0].job_id or ""
    done = await q.replay(deps, handlers.QUEUE, [one, one, "1-1"])
    assert [(r.dead_id, r.job_id) for r in done.replayed] == [(one, job)]
    assert done.gone == ["1-1"]
    assert await _status(deps, job, "queued")  # recorded `queued` by replay_dead
    assert (await q.replay(deps, handlers.QUEUE, [one])).gone == [one]  # never twice
    with pytest.raises(q.ListError, match="invalid dead-letter id"):
        await q.replay(deps, handlers.QUEUE, ["1-1; DEL"])
    with pytest.raises(q.ListError, match="unknown queue"):
        await q.replay(deps, "nope", [one])
    assert await q.count_dead(deps, handlers.QUEUE, 86_400_000) == 0  # none a day old
    assert (await q.purge(deps, handlers.QUEUE, None)).purged == 2
    assert (await q.dead_page(deps, handlers.QUEUE)).letters == []


async def test_workers_show_heartbeat_and_held_entries(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    await deps.redis.xadd(stream, {"id": "slow", "payload": json.dumps({"sleep_s": 3})})
    engine = _engine(deps)
    async with running(engine):

        async def holding() -> bool:
            page = await workers_page(deps)
            return any(h.job_id == "slow" for w in page.workers for h in w.held)

        await eventually(holding)
        page = await workers_page(deps)
        (me,) = [w for w in page.workers if w.consumer == engine.cfg.consumer]
        assert me.live
        assert me.heartbeat_age_s is not None
        assert me.heartbeat_age_s < 10
        assert [(h.queue, h.job_id, h.deliveries) for h in me.held] == [(handlers.QUEUE, "slow", 1)]
        assert handlers.QUEUE in me.queues

        async def running_one() -> bool:  # the heartbeat counts it once it is rewritten
            page = await workers_page(deps)
            return any(w.consumer == me.consumer and w.in_flight == 1 for w in page.workers)

        await eventually(running_one)


async def test_queues_page_counts_and_charts_the_last_hour(deps: Deps):
    stream = deps.keys.stream(handlers.QUEUE)
    for i in range(4):
        await deps.redis.xadd(stream, {"id": f"c{i}", "payload": json.dumps({"permanent": i == 0})})
    async with running(_engine(deps)):
        for i in range(4):
            await _until(deps, f"c{i}", "failed" if i == 0 else "completed")
    page = await q.queues_page(deps)
    (mine,) = [info for info in page.queues if info.queue == handlers.QUEUE]
    assert mine.jobs == {"completed": 3, "failed": 1}
    assert mine.dead == 1
    assert sum(p.completed for p in mine.chart) == 3
    assert sum(p.failed for p in mine.chart) == 1
    assert mine.jobs_per_s == round(4 / q.WINDOW_S, 2)
    assert all(
        p.minute > dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, minutes=1) for p in mine.chart
    )
    await asyncio.sleep(0)

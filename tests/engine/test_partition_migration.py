"""Migration 0012 turns an existing deployment's `jobs` and `job_executions` into
partitioned tables without losing a row, and everything works on them after."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from jobstream.schema.migrate import RECORD_SQL, apply_migrations, load_migrations
from jobstream.streams import PartitionPolicy, ensure_partitions, list_partitions, prune
from jobstream.streams.pg_store import JobRow, fetch_statuses, write_batch
from tests.helpers import ADMIN_URL

PARTITIONING = 12  # the migration that partitions `jobs` and `job_executions`

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
FAR = dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC)
JOBS = [  # id, status, created_at
    ("old-done", "completed", NOW - 40 * DAY),
    ("old-failed", "failed", NOW - 35 * DAY),
    ("old-live", "retrying", NOW - 45 * DAY),
    ("recent", "completed", NOW - DAY),
    ("today", "running", NOW),
    ("ahead", "completed", FAR),  # an explicit entry ID past any time a store holds
]


@pytest.fixture
async def before_partitioning() -> AsyncIterator[asyncpg.Connection]:
    """A database at the migration before partitioning, with rows, as a deployment was."""
    name = f"jst_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    conn: asyncpg.Connection = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in load_migrations():
            if m.version < PARTITIONING:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(RECORD_SQL, m.version, m.name)
        for job_id, status, created in JOBS:
            await conn.execute(
                "INSERT INTO jobs (id, queue, status, attempts, created_at, fence, "
                "stream_entry_id) VALUES ($1, 'q', $2, 1, to_timestamp($3::float8), 5, '1-0')",
                job_id, status, created.timestamp(),  # as the recorder writes it
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO job_executions (job_id, attempt, outcome, duration_ms, worker_id, "
                "started_at, finished_at, stream_entry_id, delivery) "
                "VALUES ($1, 1, 'completed', 5, 'w', $2, $2, '1-0', 1)",
                job_id, min(created, NOW),
            )  # fmt: skip
        await conn.execute(  # from before fencing: no entry, no delivery; and no job row
            "INSERT INTO job_executions (job_id, attempt, outcome, duration_ms, worker_id, "
            "started_at, finished_at) VALUES ('orphan', 1, 'failed', 5, 'w', $1, $1)",
            NOW - 50 * DAY,
        )
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migration_keeps_every_row_and_everything_works_after(before_partitioning):
    conn = before_partitioning
    jobs_before = await conn.fetch("SELECT * FROM jobs ORDER BY id")
    execs_before = await conn.fetch(
        "SELECT id, job_id, attempt, outcome, started_at FROM job_executions ORDER BY id"
    )
    applied = await apply_migrations(conn)
    # 0012 and whatever came after it
    assert [m.version for m in applied] == [
        m.version for m in load_migrations() if m.version >= PARTITIONING
    ]
    assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'jobs'") == "p"

    assert [dict(r) for r in await conn.fetch("SELECT * FROM jobs ORDER BY id")] == [
        dict(r) for r in jobs_before
    ]
    execs_after = await conn.fetch(
        "SELECT id, job_id, attempt, outcome, started_at FROM job_executions ORDER BY id"
    )
    assert [dict(r) for r in execs_after] == [dict(r) for r in execs_before]
    # Each execution lives with its job (the orphan: by its own start).
    pairs = await conn.fetch(
        "SELECT e.job_id, e.job_created_at = coalesce(j.created_at, e.started_at) AS same "
        "FROM job_executions e LEFT JOIN jobs j ON j.id = e.job_id"
    )
    assert all(r["same"] for r in pairs)
    where = {r["id"]: r["p"] for r in await conn.fetch(
        "SELECT id, tableoid::regclass::text AS p FROM jobs")}  # fmt: skip
    assert where == {**{j[0]: "jobs_legacy" for j in JOBS}, "ahead": "jobs_default"}

    # Partitions go on after the old table, which keeps its rows as one partition.
    policy = PartitionPolicy()
    created = await ensure_partitions(conn, policy)
    assert created  # from the end of the migration's day on
    parts = await list_partitions(conn)
    legacy = next(p for p in parts if p.name == "jobs_legacy")
    assert legacy.lower is None
    assert parts[-1].name == "jobs_p99991231t000000"  # for the row ahead, adopted
    days = parts[1:-1]
    assert [p.lower for p in days] == [legacy.upper] + [p.upper for p in days[:-1]]

    # Lookups by id and creation time, the fenced upsert, one partition each.
    keys = [(j[0], j[2].timestamp()) for j in JOBS]
    got = await fetch_statuses(conn, keys)
    assert {k[0]: r.status for k, r in got.items()} == {j[0]: j[1] for j in JOBS}
    t = NOW.timestamp()
    row = JobRow("today", "q", "completed", None, None, None, 1, "2-0", t, t, t, None, "9" * 40)
    await write_batch(conn, "w", [row], [])
    assert await conn.fetchval("SELECT count(*) FROM jobs WHERE id = 'today'") == 1
    assert await conn.fetchval("SELECT status FROM jobs WHERE id = 'today'") == "completed"

    assert legacy.upper is not None
    later = legacy.upper + 31 * DAY
    # The old rows are one partition: kept while a job in it is not over, then dropped whole.
    plan = await prune(conn, policy, now=later)
    assert [(p.name, p.live) for p in plan.kept] == [("jobs_legacy", 1)]
    await conn.execute("UPDATE jobs SET status = 'failed' WHERE id = 'old-live'")
    plan = await prune(conn, policy, now=later)
    assert "jobs_legacy" in {p.name for p in plan.dropped}
    assert await conn.fetchval("SELECT count(*) FROM job_executions WHERE job_id = 'orphan'") == 0


async def test_migrating_an_empty_deployment_leaves_no_legacy_partition(database: str):
    conn = await asyncpg.connect(database)
    try:
        names = {r[0] for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE 'job%legacy%'")}  # fmt: skip
        assert names == set()
        parts = await list_partitions(conn)  # made by `jobstream migrate` (and workers)
        today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        assert [p.lower for p in parts] == [today + n * DAY for n in range(4)]
    finally:
        await conn.close()

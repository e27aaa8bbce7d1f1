"""Time partitions of the job tables: lookups by id touch one partition, retention drops
whole partitions (never one holding a live job), partitions are made ahead, rows without
a partition are adopted, and one replica prunes."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import pytest

from jobstream.consumers.cli.ops import JOB_AT_SQL
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.envelope import MAX_TIME_MS
from jobstream.streams import (
    PartitionPolicy,
    ensure_partitions,
    list_dead,
    list_partitions,
    prune,
    replay_dead,
)
from jobstream.streams.pg_store import (
    FETCH_STATUSES_SQL,
    ExecRow,
    JobRow,
    fetch_statuses,
    write_batch,
)
from tests import handlers
from tests.helpers import entry_seconds, eventually, running

Q = handlers.QUEUE
MINUTE = PartitionPolicy(width_s=60, retention_s=120, ahead=2)


def _job(job_id: str, created_s: float, status: str = "completed", fence: str = "1") -> JobRow:
    done = created_s + 1 if status in ("completed", "failed") else None
    return JobRow(job_id, Q, status, "{}", None, None, 1, "1-0", created_s, created_s, done,
                  None, fence.rjust(50, "0"))  # fmt: skip


def _exec(job_id: str, created_s: float) -> ExecRow:
    return ExecRow(job_id, 1, "completed", None, 5, created_s, created_s + 1, "1-0", 1, created_s)


@pytest.fixture
async def conn(deps: Deps) -> AsyncIterator[asyncpg.Connection]:
    c: asyncpg.Connection = await asyncpg.connect(deps.settings.database_url)
    for p in await list_partitions(c):  # the template's daily ones: these tests use minutes
        await c.execute(f'DROP TABLE "{p.name}", "{p.twin}"')
    try:
        yield c
    finally:
        await c.close()


def _minute(t: dt.datetime) -> float:
    """The start of `t`'s minute, plus 1.5 s, in epoch seconds."""
    return t.replace(second=0, microsecond=0).timestamp() + 1.5


async def _now() -> dt.datetime:
    """Now, at least 15 s before the minute ends (tests count partitions by the minute)."""
    now = dt.datetime.now(dt.UTC)
    if now.second >= 45:
        await asyncio.sleep(60.5 - now.second - now.microsecond / 1e6)
        now = dt.datetime.now(dt.UTC)
    return now


async def _seed(conn: asyncpg.Connection, now: dt.datetime) -> dict[str, float]:
    """Partitions of the last 10 minutes and the next 2; one finished job in each but the
    oldest."""
    early = dataclasses.replace(MINUTE, ahead=12)
    await ensure_partitions(conn, early, now=now - dt.timedelta(minutes=10))
    times = {f"j{m}": _minute(now - dt.timedelta(minutes=m)) for m in range(10)}
    await write_batch(
        conn,
        "w",
        [_job(i, t) for i, t in times.items()],
        [_exec(i, t) for i, t in times.items()],
    )
    return times


def _scanned(plan: list[str], table: str) -> set[str]:
    """The partitions of `table` an EXPLAIN ANALYZE shows as read."""
    pattern = re.compile(rf" on ({table}_p\d{{8}}t\d{{6}}|{table}_default|{table}_legacy)\b")
    return {m[1] for line in plan if "never executed" not in line for m in pattern.finditer(line)}


async def test_a_lookup_by_id_touches_one_partition(conn: asyncpg.Connection):
    now = await _now()
    times = await _seed(conn, now)
    assert len(await list_partitions(conn)) >= 12
    explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
    # `jobstream job ID` (consumers/cli/ops.py)
    plan = [r[0] for r in await conn.fetch(explain + JOB_AT_SQL, "j4", times["j4"])]
    assert len(_scanned(plan, "jobs")) == 1, "\n".join(plan)
    assert await conn.fetchval("SELECT id FROM jobs WHERE id = 'j4'") == "j4"
    # the redelivery check (streams/pg_store.py `fetch_statuses`)
    plan = [r[0] for r in await conn.fetch(explain + FETCH_STATUSES_SQL, ["j7"], [times["j7"]])]
    assert len(_scanned(plan, "jobs")) == 1, "\n".join(plan)
    # the job's executions
    sql = "SELECT * FROM job_executions WHERE job_id = $1 AND job_created_at = to_timestamp($2)"
    plan = [r[0] for r in await conn.fetch(explain + sql, "j2", times["j2"])]
    assert len(_scanned(plan, "job_executions")) == 1, "\n".join(plan)
    # for contrast: by id alone, every partition is probed
    plan = [r[0] for r in await conn.fetch(explain + "SELECT * FROM jobs WHERE id = $1", "j2")]
    assert len(_scanned(plan, "jobs")) >= 12


async def test_fetch_statuses_finds_each_job_by_id_and_creation_time(deps: Deps, conn):
    now = await _now()
    times = await _seed(conn, now)
    got = await fetch_statuses(deps.pool, [("j1", times["j1"]), ("j3", times["j3"]),
                                           ("j1", times["j2"]), ("nope", times["j1"])])  # fmt: skip
    assert sorted(k[0] for k in got) == ["j1", "j3"]
    assert got[("j3", times["j3"])].status == "completed"


async def test_the_fenced_upsert_meets_its_row_in_its_partition(conn: asyncpg.Connection):
    """ON CONFLICT (id, created_at): the same job and time is one row, moving forward only;
    a flush sent again adds no execution (its key holds the time too)."""
    now = await _now()
    await ensure_partitions(conn, MINUTE, now=now)
    t = _minute(now)
    await write_batch(conn, "w", [_job("a", t, "running", "1")], [])
    await write_batch(conn, "w", [_job("a", t, "completed", "2")], [_exec("a", t)])
    await write_batch(conn, "w", [_job("a", t, "completed", "2")], [_exec("a", t)])
    await write_batch(conn, "w", [_job("a", t, "running", "1")], [])  # older: ignored
    rows = await conn.fetch("SELECT status, tableoid::regclass::text AS p FROM jobs")
    assert [(r["status"], r["p"]) for r in rows] == [("completed", _name(now))]
    assert await conn.fetchval("SELECT count(*) FROM job_executions") == 1


def _name(t: dt.datetime, table: str = "jobs") -> str:
    return table + t.strftime("_p%Y%m%dt%H%M00")


async def test_retention_drops_whole_partitions_and_keeps_one_with_a_live_job(conn):
    now = await _now()
    times = await _seed(conn, now)
    await write_batch(conn, "w", [_job("live", times["j6"] + 2, "running", "9")], [])
    before = {p.name for p in await list_partitions(conn)}

    plan = await prune(conn, MINUTE, dry_run=True, now=now)
    assert {p.name for p in await list_partitions(conn)} == before  # a dry run drops nothing
    assert plan.kept
    assert plan.kept[0].live == 1

    plan = await prune(conn, MINUTE, now=now)
    dropped = {p.name for p in plan.dropped}
    # Every partition wholly older than two minutes goes, but the one holding `live`.
    old = {_name(now - dt.timedelta(minutes=m)) for m in range(3, 11)}
    assert dropped == old - {_name(now - dt.timedelta(minutes=6))}
    assert [p.name for p in plan.kept] == [_name(now - dt.timedelta(minutes=6))]
    left = {r[0] for r in await conn.fetch("SELECT id FROM jobs")}
    assert left == {"j0", "j1", "j2", "j6", "live"}
    twins = {p.name for p in await list_partitions(conn, "job_executions")}
    assert twins == {"job_executions" + n.removeprefix("jobs") for n in before - dropped}
    # Nothing was deleted row by row: the partitions that stay keep every row.
    assert await conn.fetchval("SELECT count(*) FROM job_executions") == 4

    # A job over, even cancelled (a terminal status too), no longer keeps its partition.
    await write_batch(conn, "w", [_job("live", times["j6"] + 2, "cancelled", "10")], [])
    plan = await prune(conn, MINUTE, now=now)
    assert [p.name for p in plan.dropped] == [_name(now - dt.timedelta(minutes=6))]
    assert {r[0] for r in await conn.fetch("SELECT id FROM jobs")} == {"j0", "j1", "j2"}


async def test_partitions_are_made_ahead_and_rows_without_one_are_adopted(conn):
    now = await _now()
    created = await ensure_partitions(conn, MINUTE, now=now)
    assert created == [_name(now + dt.timedelta(minutes=m)) for m in range(3)]
    assert await ensure_partitions(conn, MINUTE, now=now) == []  # idempotent
    # Far from any partition: an entry ID ahead of the clock, a replay of a pruned job.
    far = MAX_TIME_MS / 1000
    past = _minute(now - dt.timedelta(days=3))
    await write_batch(conn, "w", [_job("far", far), _job("past", past)],
                      [_exec("far", far), _exec("past", past)])  # fmt: skip
    assert await conn.fetchval("SELECT count(*) FROM jobs_default") == 2
    await ensure_partitions(conn, MINUTE, now=now)
    assert await conn.fetchval("SELECT count(*) FROM jobs_default") == 0
    assert await conn.fetchval("SELECT count(*) FROM job_executions_default") == 0
    rows = await conn.fetch("SELECT id, tableoid::regclass::text AS p FROM jobs ORDER BY id")
    assert [r["p"] for r in rows] == ["jobs_p99991231t235900", _name(now - dt.timedelta(days=3))]
    got = await conn.fetchval(JOB_AT_SQL.replace("*", "id"), "far", far)
    assert got == "far"
    # The adopted old partition is past the retention: the next prune drops it whole.
    plan = await prune(conn, MINUTE, now=now)
    assert [p.name for p in plan.dropped] == [_name(now - dt.timedelta(days=3))]


async def test_a_retried_job_keeps_one_row_in_its_first_entry_partition(deps: Deps, conn):
    await ensure_partitions(conn, MINUTE)
    pub_ids = []
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):
        for i in range(3):
            payload = msgspec.json.encode({"fail_times": 2}).decode()
            eid = await deps.redis.xadd(deps.keys.stream(Q), {"id": f"r{i}", "payload": payload})
            pub_ids.append((f"r{i}", round(entry_seconds(eid) * 1000)))

        async def done() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")
            return bool(n == 3)

        await eventually(done, timeout_s=30)
    for job_id, ms in pub_ids:
        rows = await conn.fetch("SELECT created_at, attempts FROM jobs WHERE id = $1", job_id)
        assert len(rows) == 1
        assert rows[0]["attempts"] == 3
        assert rows[0]["created_at"] == dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        keys = await conn.fetch(
            "SELECT DISTINCT job_created_at FROM job_executions WHERE job_id = $1", job_id
        )
        assert [k[0] for k in keys] == [rows[0]["created_at"]]
        assert (
            await conn.fetchval("SELECT count(*) FROM job_executions WHERE job_id = $1", job_id)
            == 3
        )
        hashed = await deps.redis.hget(deps.keys.job(job_id), "created_ms")
        assert hashed == str(ms).encode()


async def test_an_old_retry_without_created_ms_updates_the_job_row(deps: Deps, conn):
    """A retry published before partitioning (attempt 2, no `created_ms`) finds its job's
    row by id and moves it forward instead of starting a second row."""
    await ensure_partitions(conn, MINUTE)
    t = time.time() - 5
    await write_batch(conn, "w", [_job("old", t, "retrying", "0")], [])
    await deps.redis.xadd(deps.keys.stream(Q), {"id": "old", "attempt": "2", "payload": "{}"})
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def done() -> bool:
            return bool(await conn.fetchval("SELECT status FROM jobs") == "completed")

        await eventually(done)
    assert await conn.fetchval("SELECT count(*) FROM jobs") == 1


async def test_an_id_published_twice_ends_both_of_its_rows(deps: Deps, conn):
    """Two entries of one job id, a second apart, are two rows (two creation times); read
    and settled together, each ends its own row, though one flush carries both."""
    await ensure_partitions(conn, MINUTE)
    now_ms = int(time.time() * 1000)
    for ms in (now_ms - 2000, now_ms - 1000):
        payload = msgspec.json.encode(handlers.Work())
        await deps.redis.xadd(
            deps.keys.stream(Q), {"id": "twice", "payload": payload}, id=f"{ms}-0"
        )
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def both_over() -> bool:
            rows = await conn.fetch("SELECT status FROM jobs WHERE id = 'twice'")
            return [r["status"] for r in rows] == ["completed", "completed"]

        await eventually(both_over)
    created = await conn.fetch("SELECT created_at FROM jobs WHERE id = 'twice' ORDER BY 1")
    assert [int(r["created_at"].timestamp() * 1000) for r in created] == [
        now_ms - 2000,
        now_ms - 1000,
    ]
    assert await conn.fetchval("SELECT count(*) FROM job_executions WHERE job_id = 'twice'") == 2


async def test_two_workers_one_prunes(deps: Deps, conn):
    now = await _now()
    await _seed(conn, now)
    s = msgspec.structs.replace(
        deps.settings, partition_width_s=60, retention_s=120, prune_interval_s=3600
    )
    d = dataclasses.replace(deps, settings=s)
    engines = [
        make_engine(d, None, None, handlers=handlers.SPECS, consumer=f"w{i}") for i in (1, 2)
    ]
    async with running(engines[0]), running(engines[1]):

        async def pruned() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM job_partition_runs"))

        await eventually(pruned)
        await asyncio.sleep(1.0)  # both have had their first round
    assert sorted(len(e.prunes) for e in engines) == [0, 1]
    by = await conn.fetchval("SELECT ran_by FROM job_partition_runs WHERE task = 'prune'")
    assert by == next(e.cfg.consumer for e in engines if e.prunes)
    assert {r[0] for r in await conn.fetch("SELECT id FROM jobs")} == {"j0", "j1", "j2"}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobstream.consumers.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_prune_command_shows_then_applies_the_retention(
    conn, env_for: Callable[..., dict[str, str]]
):
    now = await _now()
    await _seed(conn, now)
    env = env_for(JOBSTREAM_PARTITION_WIDTH_S="60", JOBSTREAM_RETENTION_S="120")
    shown = await asyncio.to_thread(_cli, env, "prune", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "would drop 8 partitions" in shown.stdout
    assert _name(now - dt.timedelta(minutes=5)) in shown.stdout
    assert await conn.fetchval("SELECT count(*) FROM jobs") == 10
    done = await asyncio.to_thread(_cli, env, "prune", "--json")
    assert done.returncode == 0, done.stderr
    out = msgspec.json.decode(done.stdout)
    assert len([p for p in out["partitions"] if p["action"] == "dropped"]) == 8
    assert await conn.fetchval("SELECT count(*) FROM jobs") == 3  # j0, j1, j2: not wholly older
    for bad in (["prune", "--older-than", "soon"], ["prune", "--bogus"]):
        r = await asyncio.to_thread(_cli, env, *bad)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    r = await asyncio.to_thread(_cli, {**env, "JOBSTREAM_RETENTION_S": "0"}, "prune")
    assert r.returncode == 2
    assert "JOBSTREAM_RETENTION_S" in r.stderr


def test_settings_hold_the_partition_knobs():
    s = Settings.from_env({"JOBSTREAM_PARTITION_WIDTH_S": "300", "JOBSTREAM_RETENTION_S": "900"})
    assert (s.partition_width_s, s.retention_s) == (300, 900.0)


async def test_a_replayed_dead_letter_reopens_the_row_in_its_partition(deps: Deps, conn):
    """The replay carries the job's creation time: one row, reopened where it was. A job
    whose row the retention dropped starts afresh, in the replay's own partition."""
    await ensure_partitions(conn, MINUTE)
    stream = deps.keys.stream(Q)
    eid = await deps.redis.xadd(stream, {"id": "dl", "payload": '{"permanent": true}'})
    await deps.redis.xadd(stream, {"id": "gone", "payload": '{"permanent": true}'})
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def failed() -> bool:
            return bool(
                await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'failed'") == 2
            )

        await eventually(failed)
    created = round(entry_seconds(eid) * 1000)
    letters = {d.fields["job_id"]: d for d in await list_dead(deps.redis, deps.keys, Q)}
    new = await replay_dead(deps.redis, deps.pool, deps.keys, letters["dl"])
    assert new is not None
    fields: Any = (await deps.redis.xrange(stream, min=new, max=new))[0][1]
    assert fields[b"created_ms"] == str(created).encode()
    rows = await conn.fetch("SELECT status, created_at FROM jobs WHERE id = 'dl'")
    assert [r["status"] for r in rows] == ["queued"]
    # `gone`: its row is no more (as after its partition was dropped)
    await conn.execute("DELETE FROM jobs WHERE id = 'gone'")
    new2 = await replay_dead(deps.redis, deps.pool, deps.keys, letters["gone"])
    assert new2 is not None
    fields = (await deps.redis.xrange(stream, min=new2, max=new2))[0][1]
    assert b"created_ms" not in fields
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def failed_again() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'failed'")
            return bool(n == 2)

        await eventually(failed_again)
    rows = await conn.fetch("SELECT created_at, attempts FROM jobs WHERE id = 'dl'")
    assert len(rows) == 1  # reopened and failed again in the same row
    assert rows[0]["created_at"] == dt.datetime.fromtimestamp(created / 1000, dt.UTC)
    gone = await conn.fetch("SELECT created_at FROM jobs WHERE id = 'gone'")
    assert [g[0] for g in gone] == [dt.datetime.fromtimestamp(entry_seconds(new2), dt.UTC)]


async def test_a_write_routed_to_the_default_partition_as_a_partition_arrives(deps: Deps, conn):
    """A flush that routed its row to the default partition just before a partition for
    it was attached (it waited for the lock) is sent again, into the new partition, and
    never taken for a row PostgreSQL refuses."""
    now = await _now()
    await ensure_partitions(conn, MINUTE, now=now)
    ahead = now + dt.timedelta(minutes=10)  # no partition yet: the default one
    lower = ahead.replace(second=0, microsecond=0)
    async with conn.transaction():  # as `ensure_partitions` does, held open
        await conn.execute("LOCK TABLE jobs_default IN SHARE ROW EXCLUSIVE MODE")
        write = asyncio.create_task(
            write_batch(deps.pool, "w", [_job("late", lower.timestamp() + 1.5)], [])
        )
        await asyncio.sleep(0.5)  # routed to jobs_default, waiting for its lock
        assert not write.done()
        await conn.execute(
            "CREATE TABLE jobs_x (LIKE jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        await conn.execute(
            "ALTER TABLE jobs ATTACH PARTITION jobs_x FOR VALUES FROM ($1) TO ($2)".replace(
                "$1", f"'{lower.isoformat()}'"
            ).replace("$2", f"'{(lower + dt.timedelta(minutes=1)).isoformat()}'")
        )
    await asyncio.wait_for(write, 10)
    row = await conn.fetchrow("SELECT status, tableoid::regclass::text AS p FROM jobs")
    assert (row["status"], row["p"]) == ("completed", "jobs_x")

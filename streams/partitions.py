"""Time partitions of `jobs` and `job_executions`: created ahead, dropped whole past retention.

Both tables are partitioned by the job's creation time (`jobs.created_at`,
`job_executions.job_created_at`) in pairs of equal bounds (`jobs_p<time>` and
`job_executions_p<time>`). Nothing here deletes a row: retention drops a pair of partitions
whose every time is past it, and keeps (and reports) a pair holding a job not yet over.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "Partition",
    "PartitionPolicy",
    "PrunePlan",
    "ensure_partitions",
    "list_partitions",
    "maintain",
    "prune",
    "prune_if_due",
]

logger = logging.getLogger(__name__)

_ENSURE_LOCK = 0x6A6F6270  # "jobp": partition DDL, one replica at a time
_PRUNE_LOCK = 0x6A6F6271  # "jobq": the daily prune, one replica at a time
_MAX_ADOPT = 100  # partitions created per run for rows waiting in the default partition
_END_S = 253_402_300_800  # 10000-01-01T00:00:00Z, past Python's datetime
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Bounds as PostgreSQL renders them, read back as timestamptz in the same session (so in
# the same time zone). MINVALUE / MAXVALUE / DEFAULT leave them NULL.
LIST_SQL = """
SELECT c.relname AS name,
       pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]
           ::timestamptz AS lower,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]
           ::timestamptz AS upper,
       pg_total_relation_size(c.oid) AS bytes,
       greatest(c.reltuples, 0)::bigint AS rows_estimate
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::regclass
ORDER BY lower NULLS FIRST
"""
DEFAULT_BUCKETS_SQL = """
SELECT DISTINCT floor(extract(epoch FROM created_at) / $1)::bigint AS bucket
FROM jobs_default
UNION
SELECT DISTINCT floor(extract(epoch FROM job_created_at) / $1)::bigint FROM job_executions_default
ORDER BY bucket LIMIT $2
"""
LIVE_SQL = "SELECT count(*) FROM {} WHERE status NOT IN ('completed', 'failed', 'cancelled')"
LAST_RUN_SQL = "SELECT ran_at FROM job_partition_runs WHERE task = 'prune'"
RECORD_RUN_SQL = """
INSERT INTO job_partition_runs (task, ran_at, ran_by) VALUES ('prune', now(), $1)
ON CONFLICT (task) DO UPDATE SET ran_at = now(), ran_by = $1
"""


@dataclass(frozen=True, slots=True)
class PartitionPolicy:
    """How wide a partition is, how many are made ahead, how long terminal jobs are kept."""

    width_s: int = 86_400
    retention_s: float = 30 * 86_400.0
    ahead: int = 3
    prune_interval_s: float = 86_400.0

    @property
    def check_interval_s(self) -> float:
        """How often a worker makes sure the partitions ahead exist."""
        return max(1.0, min(self.width_s / 4, 600.0))


@dataclass(frozen=True, slots=True)
class Partition:
    """A `jobs` partition with its `job_executions` twin; bounds None: unbounded."""

    name: str
    lower: dt.datetime | None
    upper: dt.datetime | None
    bytes: int = 0  # both tables, with their indexes
    rows: int = 0  # an estimate (the planner's)
    live: int = 0  # jobs not over (filled in by `prune`)

    @property
    def twin(self) -> str:
        return "job_executions" + self.name.removeprefix("jobs")


@dataclass(slots=True)
class PrunePlan:
    """What a prune drops (or would), what it keeps although past the retention, and why."""

    cutoff: dt.datetime
    dropped: list[Partition] = field(default_factory=list)
    kept: list[Partition] = field(default_factory=list)
    default_rows: int = 0


async def _bound(conn: Conn) -> None:
    """Keep this transaction's locks short, whatever happens to this process.

    Its DDL locks block every reader of `jobs`: it waits at most `lock_timeout` for them
    (so it never queues long ahead of the readers behind it), and a replica paused while
    it holds them (SIGSTOP, a frozen VM) loses its session, and so its locks, to
    `idle_in_transaction_session_timeout`. What fails is tried again at the next round.
    """
    await conn.execute("SET LOCAL lock_timeout = '5s'")
    await conn.execute("SET LOCAL idle_in_transaction_session_timeout = '5s'")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(ts: dt.datetime | None, unbounded: str) -> str:
    return unbounded if ts is None else f"'{ts.isoformat()}'"


def _at(seconds: float) -> dt.datetime | None:
    """A time of a bucket bound; None past what Python holds (the partition is unbounded)."""
    if seconds >= _END_S:
        return None
    return _EPOCH + dt.timedelta(seconds=seconds)


async def list_partitions(conn: Conn, table: str = "jobs") -> list[Partition]:
    """The time partitions of `table` (its default partition left out), oldest first."""
    out = []
    for row in await conn.fetch(LIST_SQL, table):
        if not row["is_default"]:
            out.append(Partition(row["name"], row["lower"], row["upper"], row["bytes"],
                                 row["rows_estimate"]))  # fmt: skip
    return out


def _clip(
    lower: dt.datetime, upper: dt.datetime | None, existing: list[Partition]
) -> tuple[dt.datetime, dt.datetime | None] | None:
    """[lower, upper) less the partitions that exist (its first free stretch), or None."""
    for p in existing:
        starts_before = p.lower is None or p.lower <= lower
        ends_after = p.upper is None or p.upper > lower
        if starts_before and ends_after:
            if p.upper is None or (upper is not None and p.upper >= upper):
                return None
            lower = p.upper
    for p in existing:
        if p.lower is not None and p.lower > lower and (upper is None or p.lower < upper):
            upper = p.lower
    return lower, upper


async def _create(conn: Conn, lower: dt.datetime, upper: dt.datetime | None) -> str:
    """Create the pair of partitions for [lower, upper), adopting rows the default ones hold
    there. ATTACH (not CREATE ... PARTITION OF) keeps writers of the parent running."""
    suffix = lower.strftime("_p%Y%m%dt%H%M%S")
    bounds = f"FROM ({_literal(lower, 'MINVALUE')}) TO ({_literal(upper, 'MAXVALUE')})"
    upper_cond = "" if upper is None else " AND {col} < $2"
    for table, col in (("jobs", "created_at"), ("job_executions", "job_created_at")):
        name = _quote(table + suffix)
        await conn.execute(f"LOCK TABLE {table}_default IN SHARE ROW EXCLUSIVE MODE")
        room = " WITH (fillfactor = 50)" if table == "jobs" else ""  # HOT updates (0013)
        await conn.execute(
            f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){room}"
        )
        where = f"{col} >= $1" + upper_cond.format(col=col)
        args = (lower,) if upper is None else (lower, upper)
        await conn.execute(
            f"WITH moved AS (DELETE FROM {table}_default WHERE {where} RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved",
            *args,
        )
        await conn.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES {bounds}")
    return "jobs" + suffix


async def ensure_partitions(
    conn: Conn, policy: PartitionPolicy, now: dt.datetime | None = None
) -> list[str]:
    """Create the partition of `now` and `policy.ahead` more, and partitions for the rows
    waiting in the default partitions; return the names created. Idempotent; replicas
    running it at once take turns (an advisory lock)."""
    async with conn.transaction():
        await _bound(conn)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _ENSURE_LOCK)
        if now is None:
            now = await conn.fetchval("SELECT now()")
        width = policy.width_s
        first = math.floor(now.timestamp() / width)
        buckets = set(range(first, first + policy.ahead + 1))
        rows = await conn.fetch(DEFAULT_BUCKETS_SQL, float(width), _MAX_ADOPT)
        buckets |= {int(r["bucket"]) for r in rows}
        existing = await list_partitions(conn)
        created = []
        for bucket in sorted(buckets):
            lower = _at(bucket * width)
            if lower is None:
                continue
            span = _clip(lower, _at((bucket + 1) * width), existing)
            if span is None:
                continue
            name = await _create(conn, *span)
            existing.append(Partition(name, *span))
            created.append(name)
    if created:
        logger.info("job partitions created: %s", ", ".join(created))
    return created


async def prune(
    conn: Conn,
    policy: PartitionPolicy,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PrunePlan:
    """Drop every pair of partitions wholly older than the retention whose jobs are all
    over; keep (and report) those holding a job still queued, running or retrying.

    Each drop is its own short transaction that first locks both parents (writers wait
    for it, at most `lock_timeout`) and checks again that no live job came in.
    """
    if now is None:
        now = await conn.fetchval("SELECT now()")
    plan = PrunePlan(now - dt.timedelta(seconds=policy.retention_s))
    plan.default_rows = await conn.fetchval("SELECT count(*) FROM jobs_default")
    for p in await list_partitions(conn):
        if p.upper is None or p.upper > plan.cutoff:
            continue
        twin = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", p.twin)
        p = Partition(p.name, p.lower, p.upper, p.bytes + (twin or 0), p.rows,
                      await conn.fetchval(LIVE_SQL.format(_quote(p.name))))  # fmt: skip
        if p.live or dry_run:
            (plan.kept if p.live else plan.dropped).append(p)
            continue
        live = await _drop(conn, p)
        if live:
            plan.kept.append(Partition(p.name, p.lower, p.upper, p.bytes, p.rows, live))
        else:
            plan.dropped.append(p)
    for p in plan.kept:
        logger.warning(
            "partition %s kept past the retention: %d jobs in it are not over "
            "(jobstream prune lists them)", p.name, p.live,
        )  # fmt: skip
    return plan


async def _drop(conn: Conn, p: Partition) -> int:
    """Drop the pair unless a live job came in meanwhile; return how many did (0: dropped)."""
    async with conn.transaction():
        await _bound(conn)
        await conn.execute("LOCK TABLE ONLY jobs, ONLY job_executions IN ACCESS EXCLUSIVE MODE")
        live = await conn.fetchval(LIVE_SQL.format(_quote(p.name)))
        if live:
            return int(live)
        await conn.execute(f"DROP TABLE {_quote(p.name)}, {_quote(p.twin)}")
    logger.info("partition %s dropped (jobs created before %s)", p.name, p.upper)
    return 0


async def prune_if_due(conn: Conn, policy: PartitionPolicy, worker_id: str) -> PrunePlan | None:
    """Prune when no replica has for `policy.prune_interval_s`; None when not due or
    another replica is pruning now (an advisory lock makes it one at a time)."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _PRUNE_LOCK):
        return None
    try:
        last = await conn.fetchval(LAST_RUN_SQL)
        now = await conn.fetchval("SELECT now()")
        if last is not None and (now - last).total_seconds() < policy.prune_interval_s:
            return None
        plan = await prune(conn, policy)
        await conn.execute(RECORD_RUN_SQL, worker_id)
        return plan
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _PRUNE_LOCK)


async def maintain(pool: asyncpg.Pool, policy: PartitionPolicy, worker_id: str) -> PrunePlan | None:
    """A worker's round: make the partitions ahead, and prune when due (see `prune_if_due`)."""
    async with pool.acquire() as conn:
        await ensure_partitions(conn, policy)
        plan = await prune_if_due(conn, policy, worker_id)
    if plan is not None:
        logger.info("retention applied by %s: %d partitions dropped, %d kept with live jobs",
                    worker_id, len(plan.dropped), len(plan.kept))  # fmt: skip
    return plan

"""The PostgreSQL side of status recording: one statement per flush for every job in it.

`jobs` is upserted, moving forward only (see `WRITE_BATCH_SQL`), and `job_executions` gets
one row per finished delivery of an attempt, in the same round trip. Both are partitioned
by the job's creation time, which every write and lookup names (`created_at`), so each
touches one partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["ExecRow", "JobRow", "fetch_statuses", "find_created", "write_batch"]

# A row moves forward only (DESIGN inv. 9): a terminal status is never overwritten, an
# older delivery (lower fence) never overwrites a newer one, and within one delivery the
# outcome (rank 2) follows `running` (rank 1). Re-sending the same flush changes nothing.
WRITE_BATCH_SQL = """
WITH up AS (
    INSERT INTO jobs AS j (id, queue, status, payload, result, error, attempts, worker_id,
                           stream_entry_id, created_at, started_at, completed_at, updated_at,
                           next_attempt_at, fence, trace_id)
    SELECT u.id, u.queue, u.status, u.payload::jsonb, u.result::jsonb, u.error, u.attempt,
           $13, u.entry_id, to_timestamp(u.created_at), to_timestamp(u.started_at),
           to_timestamp(u.completed_at), now(), to_timestamp(u.next_attempt_at),
           u.fence::numeric, u.trace_id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::int[], $8::text[], $9::float8[], $10::float8[], $11::float8[],
                $12::float8[], $21::text[], $25::text[])
         AS u(id, queue, status, payload, result, error, attempt, entry_id, created_at,
              started_at, completed_at, next_attempt_at, fence, trace_id)
    ON CONFLICT (id, created_at) DO UPDATE SET
        status = EXCLUDED.status,
        payload = COALESCE(EXCLUDED.payload, j.payload),
        result = EXCLUDED.result,
        error = EXCLUDED.error,
        attempts = EXCLUDED.attempts,
        worker_id = EXCLUDED.worker_id,
        stream_entry_id = EXCLUDED.stream_entry_id,
        started_at = EXCLUDED.started_at,
        completed_at = EXCLUDED.completed_at,
        updated_at = now(),
        next_attempt_at = EXCLUDED.next_attempt_at,
        fence = EXCLUDED.fence,
        trace_id = COALESCE(EXCLUDED.trace_id, j.trace_id)
    WHERE j.status NOT IN ('completed', 'failed', 'cancelled')
      AND (j.fence IS NULL OR EXCLUDED.fence > j.fence
           OR (EXCLUDED.fence = j.fence AND j.status = 'running'
               AND EXCLUDED.status <> 'running'))
    RETURNING 1
), ex AS (
    INSERT INTO job_executions (job_id, attempt, outcome, error, duration_ms, worker_id,
                                started_at, finished_at, stream_entry_id, delivery,
                                job_created_at)
    SELECT e.job_id, e.attempt, e.outcome, e.error, e.duration_ms, $13,
           to_timestamp(e.started_at), to_timestamp(e.finished_at), e.entry_id, e.delivery,
           to_timestamp(e.created_at)
    FROM unnest($14::text[], $15::int[], $16::text[], $17::text[], $18::int[],
                $19::float8[], $20::float8[], $22::text[], $23::int[], $24::float8[])
         AS e(job_id, attempt, outcome, error, duration_ms, started_at, finished_at,
              entry_id, delivery, created_at)
    ON CONFLICT (job_id, attempt, stream_entry_id, delivery, job_created_at) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM up) AS jobs, (SELECT count(*) FROM ex) AS executions
"""

# One probe per key (a LATERAL join with LIMIT keeps it a nested loop): the key's creation
# time prunes each probe to one partition, at execution time, generic plan or not.
FETCH_STATUSES_SQL = """
SELECT k.id, k.created_s, j.*
FROM unnest($1::text[], $2::float8[]) AS k(id, created_s)
CROSS JOIN LATERAL (
    SELECT queue, status, result::text AS result, error, attempts, stream_entry_id,
           extract(epoch FROM created_at)::float8 AS created_at,
           extract(epoch FROM started_at)::float8 AS started_at,
           extract(epoch FROM completed_at)::float8 AS completed_at
    FROM jobs WHERE jobs.id = k.id AND jobs.created_at = to_timestamp(k.created_s)
    LIMIT 1
) AS j
"""
# A job whose creation time its entry does not tell (an entry from before partitioning,
# or an `attempt` above 1 from a producer): its newest row, probing every partition's index.
FIND_CREATED_SQL = """
SELECT DISTINCT ON (id) id, extract(epoch FROM created_at)::float8 AS created_at
FROM jobs WHERE id = ANY($1::text[]) ORDER BY id, created_at DESC
"""


@dataclass(slots=True)
class JobRow:
    id: str
    queue: str
    status: str
    payload: str | None
    result: str | None
    error: str | None
    attempt: int
    entry_id: str
    created_at: float
    started_at: float | None
    completed_at: float | None
    next_attempt_at: float | None
    fence: str
    trace_id: str | None = None  # 32 hex digits: the trace this attempt ran in


@dataclass(slots=True)
class ExecRow:
    job_id: str
    attempt: int
    outcome: str
    error: str | None
    duration_ms: int
    started_at: float
    finished_at: float
    entry_id: str
    delivery: int
    created_at: float  # the job's creation time: its partition


async def write_batch(
    conn: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy,
    worker_id: str,
    jobs: Sequence[JobRow],
    executions: Sequence[ExecRow],
) -> None:
    """Upsert `jobs` and insert `job_executions` in one round trip (one implicit transaction).

    A statement that routed a row to a default partition just before a partition for it
    was attached fails its partition constraint: it changed nothing, and is sent again
    (with the new partitions), never taken for a row PostgreSQL refuses.
    """
    for attempt in range(_REROUTES + 1):
        try:
            await _write(conn, worker_id, jobs, executions)
            return
        except asyncpg.CheckViolationError as exc:
            if "partition constraint" not in str(exc) or attempt == _REROUTES:
                raise


_REROUTES = 3


async def _write(
    conn: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy,
    worker_id: str,
    jobs: Sequence[JobRow],
    executions: Sequence[ExecRow],
) -> None:
    await conn.execute(
        WRITE_BATCH_SQL,
        [r.id for r in jobs],
        [r.queue for r in jobs],
        [r.status for r in jobs],
        [r.payload for r in jobs],
        [r.result for r in jobs],
        [r.error for r in jobs],
        [r.attempt for r in jobs],
        [r.entry_id for r in jobs],
        [r.created_at for r in jobs],
        [r.started_at for r in jobs],
        [r.completed_at for r in jobs],
        [r.next_attempt_at for r in jobs],
        worker_id,
        [e.job_id for e in executions],
        [e.attempt for e in executions],
        [e.outcome for e in executions],
        [e.error for e in executions],
        [e.duration_ms for e in executions],
        [e.started_at for e in executions],
        [e.finished_at for e in executions],
        [r.fence for r in jobs],
        [e.entry_id for e in executions],
        [e.delivery for e in executions],
        [e.created_at for e in executions],
        [r.trace_id for r in jobs],
    )


async def fetch_statuses(
    pool: asyncpg.Pool | asyncpg.Connection, keys: Sequence[tuple[str, float]]
) -> dict[tuple[str, float], JobRow]:
    """The PostgreSQL row (without its payload and fence) of each job that has one, by
    (job id, creation time in epoch seconds): the time names the partition to look in."""
    rows = await pool.fetch(FETCH_STATUSES_SQL, [k[0] for k in keys], [k[1] for k in keys])
    return {(row["id"], row["created_s"]): _row(row) for row in rows}


async def find_created(
    conn: asyncpg.Pool | asyncpg.Connection, job_ids: Sequence[str]
) -> dict[str, float]:
    """The creation time (epoch seconds) of each job id's newest row, looked up in every
    partition: only for entries that do not carry their job's creation time."""
    rows = await conn.fetch(FIND_CREATED_SQL, list(job_ids))
    return {row["id"]: row["created_at"] for row in rows}


def _row(row: asyncpg.Record) -> JobRow:
    return JobRow(
        row["id"], row["queue"], row["status"], None, row["result"], row["error"],
        row["attempts"], row["stream_entry_id"] or "", row["created_at"] or 0.0,
        row["started_at"], row["completed_at"], None, "",
    )  # fmt: skip

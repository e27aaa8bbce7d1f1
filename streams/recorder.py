"""Settlement, batched: record outcomes in PostgreSQL, then retry/dead-letter, hash and ack.

Concurrent jobs share one PostgreSQL statement and one Redis pipeline per flush. The flush
never raises: it retries its stores with backoff (inv. 7), and acks only what PostgreSQL
has committed (inv. 1). A failing hash write is logged and never fails a job (inv. 2).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import hiredis
import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from streams.backoff import retry_until_done
from streams.dead_letters import dead_fields
from streams.job import Delivery, Outcome, Result
from streams.keys import Keys
from streams.pg_store import ExecRow, JobRow, write_batch
from streams.status import Status

__all__ = ["Recorder", "RecorderConfig", "Start"]

logger = logging.getLogger(__name__)

_STATUS = {
    Outcome.COMPLETED: Status.COMPLETED,
    Outcome.RETRYING: Status.RETRYING,
    Outcome.FAILED: Status.FAILED,
}
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
_PG_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_REDIS_ERRORS = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclass(slots=True)
class Start:
    """A job that just started: recorded `running` by the next flush, never awaited."""

    delivery: Delivery
    job_id: str
    attempt: int
    payload: bytes
    started_at: float


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    group: str
    worker_id: str
    keys: Keys
    hash_ttl_s: int = 7 * 24 * 3600
    dead_maxlen: int = 100_000
    max_batch: int = 2000
    max_backlog: int = 4000
    redis_timeout_s: float = 30.0


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _text(value: str | None) -> str | None:
    """Text PostgreSQL accepts: no NUL characters."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def _payload_text(payload: bytes | None) -> str | None:
    if payload is None:
        return None
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return None
    # jsonb refuses NUL characters; such a payload stays in the stream and dead letters.
    return None if "\\u0000" in text else text


class Recorder:
    """Coalesces status writes and acks of concurrent jobs into one flush at a time."""

    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        config: RecorderConfig,
        on_done: Callable[[Delivery], None] | None = None,
    ) -> None:
        """`on_done(delivery)` is called once an outcome's settlement is over (its entry
        acked, or left to its new holder), never while it waits to be re-sent."""
        self._redis = redis
        self._on_done = on_done
        self._later: dict[int, Result] = {}  # waiting to be re-sent, by id()
        self._pool = pool
        self._cfg = config
        self._pending: list[Start | Result] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down: set[str] = set()  # stores known to be unavailable
        self.settled = 0
        self._flushing = 0
        self._batch: list[Start | Result] = []
        self._progress_at = time.time()
        self.has_room = asyncio.Event()  # cleared while the backlog is over max_backlog
        self.has_room.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="recorder")

    async def close(self, timeout_s: float = 30.0) -> int:
        """Flush everything outstanding (waiting at most `timeout_s`), then stop.

        Returns how many records could not be written; their entries stay pending, unacked,
        for another worker (inv. 1), which is safe but means they will run again.
        """
        deadline = time.monotonic() + timeout_s
        while self.backlog and time.monotonic() < deadline and self._task is not None:
            self._wake.set()
            await asyncio.sleep(0.005)
        left = self.backlog
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if left:
            logger.error("%d outcomes not recorded before exit: their entries stay pending", left)
        return left

    @property
    def backlog(self) -> int:
        """Records not yet committed and acked, the flush in progress included."""
        return len(self._pending) + self._flushing

    def stalled_s(self) -> float:
        """Seconds outcomes have waited with no flush completing (0 when nothing waits)."""
        return time.time() - self._progress_at if self.backlog else 0.0

    def entry_ids(self) -> set[str]:
        """Entries whose records are waiting, being written or to be re-sent (not acked)."""
        items = (*self._batch, *self._pending, *self._later.values())
        return {item.delivery.entry_id for item in items}

    def started(self, start: Start) -> None:
        """Queue the `running` record of a job; the handler does not wait for it."""
        if not self.backlog:
            self._progress_at = time.time()
        self._pending.append(start)
        self._wake.set()

    def settle(self, result: Result) -> None:
        """Hand over an outcome: the recorder commits it, then retries/dead-letters and acks.

        The caller does not wait; `close()` flushes whatever is outstanding (inv. 1, 6).
        """
        if not self.backlog:
            self._progress_at = time.time()
        self._pending.append(result)
        self._wake.set()
        if len(self._pending) > self._cfg.max_backlog:
            self.has_room.clear()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._flush_some()
                except Exception:  # the loop must outlive any one batch (settle never raises)
                    logger.exception("flush failed; its records are retried in 1s")
                    self._pending[:0] = self._batch  # back in front, in order
                    self._batch, self._flushing = [], 0
                    await asyncio.sleep(1.0)

    async def _flush_some(self) -> None:
        batch = self._pending[: self._cfg.max_batch]
        del self._pending[: len(batch)]
        self._flushing = len(batch)
        self._batch = batch
        results = [item for item in batch if isinstance(item, Result)]
        jobs, execs = self._rows(batch)
        if jobs or execs:
            await self._write_pg(jobs, execs)
        await self._write_redis(jobs, results)
        if self._on_done is not None:
            later = self._later
            for r in results:
                if id(r) not in later:
                    self._on_done(r.delivery)
        self.settled += len(results)
        self._progress_at = time.time()
        self._flushing = 0
        self._batch = []
        if len(self._pending) <= self._cfg.max_backlog:
            self.has_room.set()

    def _rows(self, batch: Sequence[Start | Result]) -> tuple[list[JobRow], list[ExecRow]]:
        """One row per job id (ON CONFLICT may touch a row once): the latest record wins,
        so the batch is read newest first and a job's earlier records are not built at all.
        """
        rows: dict[str, JobRow] = {}
        execs: list[ExecRow] = []
        for item in reversed(batch):
            if isinstance(item, Result):
                if item.outcome is Outcome.SKIPPED:
                    continue
                if item.executed:
                    execs.append(_exec_row(item))
            if item.job_id not in rows:
                rows[item.job_id] = _start_row(item) if isinstance(item, Start) else _job_row(item)
        return list(rows.values()), execs

    async def _write_pg(self, jobs: list[JobRow], execs: list[ExecRow]) -> None:
        async def write() -> None:
            try:
                await write_batch(self._pool, self._cfg.worker_id, jobs, execs)
            except _DATA_ERRORS as exc:
                logger.warning("batch refused by PostgreSQL (%s); writing jobs one by one", exc)
                await self._write_pg_singly(jobs, execs)

        # inv. 7: wait for PostgreSQL, acking nothing meanwhile.
        await retry_until_done(
            write, errors=_PG_ERRORS, what="PostgreSQL", down=self._down, log=logger
        )

    async def _write_pg_singly(self, jobs: list[JobRow], execs: list[ExecRow]) -> None:
        """One bad row must not block the others: write each alone, degrading what it keeps."""
        for row in jobs:
            mine = [e for e in execs if e.job_id == row.id]
            try:
                await write_batch(self._pool, self._cfg.worker_id, [row], mine)
                continue
            except _DATA_ERRORS as exc:
                row.payload = None
                row.result = None
                row.error = f"{row.error or ''} (payload or result not storable: {exc})".strip()
            try:
                await write_batch(self._pool, self._cfg.worker_id, [row], mine)
            except _DATA_ERRORS as exc:  # the row itself is beyond storing: say so loudly
                logger.error("job %s could not be recorded and is dropped: %s", row.id, exc)

    async def _write_redis(self, jobs: list[JobRow], results: list[Result]) -> None:
        await retry_until_done(
            lambda: self._pipeline(jobs, results),
            errors=_REDIS_ERRORS, what="Redis", down=self._down, log=logger,
        )  # fmt: skip

    async def _pipeline(self, jobs: list[JobRow], results: list[Result]) -> None:
        keys, cfg = self._cfg.keys, self._cfg
        cmds: list[tuple[Any, ...]] = []
        now = _iso(time.time())
        for row in jobs:
            cmds.append(self._hset(row, now))
            if row.status in (Status.COMPLETED, Status.FAILED):
                cmds.append(("EXPIRE", keys.job(row.id), cfg.hash_ttl_s))
        hash_cmds = len(cmds)
        acks: dict[str, list[str]] = {}
        guarded: list[tuple[int, Result]] = []  # a retry or dead letter, and its command
        for r in results:
            cmd = self._follow_up(r)
            if cmd is None:
                acks.setdefault(r.delivery.queue, []).append(r.delivery.entry_id)
            else:
                guarded.append((len(cmds), r))
                cmds.append(cmd)
        cmds += [("XACK", keys.stream(q), cfg.group, *ids) for q, ids in acks.items()]
        if not cmds:
            return
        replies = await self._send(cmds)
        self._check(replies, hash_cmds)
        await self._ack_guarded(guarded, replies)

    async def _ack_guarded(self, guarded: list[tuple[int, Result]], replies: list[object]) -> None:
        """inv. 1: an entry whose retry or dead letter was not written is not acked."""
        keys, cfg = self._cfg.keys, self._cfg
        written: dict[str, list[str]] = {}
        refused = []
        for i, r in guarded:
            if isinstance(replies[i], Exception):
                refused.append(r)
            else:
                written.setdefault(r.delivery.queue, []).append(r.delivery.entry_id)
        if written:
            acked = [("XACK", keys.stream(q), cfg.group, *ids) for q, ids in written.items()]
            self._check(await self._send(acked), 0)
        if refused:
            logger.error("%d retries or dead letters not written: kept unacked, retried in 1s",
                         len(refused))  # fmt: skip
            for r in refused:
                r.executed = False  # its execution row is already committed
                self._settle_later(r)

    def _settle_later(self, r: Result) -> None:
        """Settle `r` again in 1 s; its entry stays held by this process meanwhile."""
        self._later[id(r)] = r

        def again() -> None:
            self._later.pop(id(r), None)
            self.settle(r)

        asyncio.get_running_loop().call_later(1.0, again)

    def _follow_up(self, r: Result) -> tuple[Any, ...] | None:
        """The retry (delayed set) or dead-letter command an outcome needs before its ack."""
        d, keys = r.delivery, self._cfg.keys
        if r.outcome is Outcome.RETRYING and r.retry_at is not None:
            member = msgspec.json.encode(r.retry_fields)
            return ("ZADD", keys.delayed(d.queue), int(r.retry_at * 1000), member)
        if r.outcome is not Outcome.FAILED:
            return None
        fields = dead_fields(
            d.fields,
            queue=d.queue,
            job_id=r.job_id,
            entry_id=d.entry_id,
            reason=r.reason or "failed",
            error=r.error or "",
            attempts=r.attempt,
            failed_at=r.finished_at or time.time(),
        )
        flat = [x for kv in fields.items() for x in kv]
        return ("XADD", keys.dead(d.queue), "MAXLEN", "~", self._cfg.dead_maxlen, "*", *flat)

    async def _send(self, cmds: list[tuple[Any, ...]]) -> list[object]:
        """Send commands in one round trip; packed by hiredis, which is much cheaper per job."""
        pool = self._redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            # One deadline for the whole round trip instead of one per reply.
            async with asyncio.timeout(self._cfg.redis_timeout_s):
                await conn.send_packed_command(b"".join(map(hiredis.pack_command, cmds)), False)
                replies: list[object] = []
                for _ in cmds:
                    try:
                        replies.append(await conn.read_response(timeout=math.inf))
                    except redis.exceptions.ResponseError as exc:
                        replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    def _check(self, replies: list[object], hash_cmds: int) -> None:
        for i, reply in enumerate(replies):
            if not isinstance(reply, Exception):
                continue
            if i < hash_cmds:  # inv. 2: the hash is a view; its failure fails no job
                logger.warning("job hash write failed: %s", reply)
            else:
                logger.error("settlement command failed: %s", reply)

    def _hset(self, row: JobRow, now: str) -> tuple[Any, ...]:
        cmd: list[Any] = ["HSET", self._cfg.keys.job(row.id), "status", row.status.encode(),
                          "queue", row.queue, "attempt", row.attempt, "worker_id",
                          self._cfg.worker_id, "updated_at", now]  # fmt: skip
        if row.started_at is not None:
            cmd += ("started_at", _iso(row.started_at))
        if row.status in (Status.COMPLETED, Status.FAILED):
            cmd += ("completed_at", _iso(row.completed_at), "result", row.result or "")
            cmd += ("error", row.error or "")
        elif row.status == Status.RETRYING:
            cmd += ("error", row.error or "")
        return tuple(cmd)


def _start_row(item: Start) -> JobRow:
    d = item.delivery
    return JobRow(
        item.job_id, d.queue, Status.RUNNING, _payload_text(item.payload), None, None,
        item.attempt, d.entry_id, _created(d), item.started_at, None, None,
    )  # fmt: skip


def _job_row(r: Result) -> JobRow:
    d = r.delivery
    done = r.finished_at if r.outcome is not Outcome.RETRYING else None
    return JobRow(
        r.job_id, d.queue, _STATUS[r.outcome], _payload_text(r.payload), r.result_json,
        _text(r.error), r.attempt, d.entry_id, _created(d), r.started_at or None, done,
        r.retry_at,
    )  # fmt: skip


def _exec_row(r: Result) -> ExecRow:
    return ExecRow(
        r.job_id, r.attempt, r.outcome.value, _text(r.error), r.duration_ms, r.started_at,
        r.finished_at,
    )  # fmt: skip


def _created(d: Delivery) -> float:
    return int(d.entry_id.partition("-")[0]) / 1000.0

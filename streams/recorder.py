"""Settlement, batched: record outcomes in PostgreSQL, then retry/dead-letter, hash and ack.

Concurrent jobs share one PostgreSQL statement and one Redis pipeline per flush. The flush
never raises: it retries its stores with backoff (inv. 7), and acks only what PostgreSQL
has committed (inv. 1). A failing hash write is logged and never fails a job (inv. 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import hiredis
import msgspec
import redis.exceptions
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio.cluster import RedisCluster

from jobstream.schema.envelope import MAX_TIME_MS, created_ms
from jobstream.schema.text import as_text, clean_text
from jobstream.schema.times import utc_iso
from jobstream.streams.backoff import retry_until_done
from jobstream.streams.dead_letters import dead_fields
from jobstream.streams.job import Delivery, Result
from jobstream.streams.keys import Keys, queue_of_part
from jobstream.streams.lease import Lease
from jobstream.streams.pg_store import ExecRow, JobRow, find_created, write_batch
from jobstream.streams.progress import ProgressBuffer
from jobstream.streams.redis_client import (
    REDIS_ERRORS,
    AnyRedis,
    NotReplicated,
    load_scripts,
    send_many,
)
from jobstream.streams.status import TERMINAL, Outcome, Reason, Status

__all__ = ["Recorder", "RecorderConfig", "Start"]

logger = logging.getLogger(__name__)

_STATUS = {
    Outcome.COMPLETED: Status.COMPLETED,
    Outcome.RETRYING: Status.RETRYING,
    Outcome.FAILED: Status.FAILED,
    Outcome.CANCELLED: Status.CANCELLED,
}
# Refusals of what a row holds (ProgramLimitExceeded: e.g. a jsonb nested too deep).
_DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
_MAX_TIME_S = MAX_TIME_MS / 1000
_PG_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_MAX_DEAD_FIELDS = 1000  # a dead letter keeps at most this many of an entry's fields


def _script(name: str) -> tuple[bytes, bytes]:
    """A Lua script of `streams/lua` and its SHA-1, for EVALSHA."""
    body = resources.files("jobstream.streams.lua").joinpath(name).read_bytes()
    return body, hashlib.sha1(body, usedforsecurity=False).hexdigest().encode()


_SETTLE = _script("settle.lua")
_SETHASH = _script("sethash.lua")
_OWNED = _script("owned.lua")
_PROGRESS = _script("progress.lua")


@dataclass(slots=True)
class Start:
    """A job that just started: recorded `running` by the next flush, never awaited."""

    delivery: Delivery
    job_id: str
    attempt: int
    payload: bytes
    started_at: float
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    group: str
    worker_id: str
    keys: Keys
    hash_ttl_s: int  # the engine's defaults live in EngineConfig
    dead_maxlen: int
    max_batch: int = 2000
    max_backlog: int = 4000
    redis_timeout_s: float = 30.0
    progress_interval_s: float = 1.0
    wait_replicas: int = 0  # settlement waits for this many replicas (Redis WAIT)
    wait_timeout_ms: int = 1000


def _iso(ts: float | None) -> str:
    """`2026-11-30T10:00:00.123Z`; the seconds' part is formatted once per second."""
    if ts is None:
        return ""
    return utc_iso(ts)


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
        redis: AnyRedis,
        pool: asyncpg.Pool,
        config: RecorderConfig,
        lease: Lease | None = None,
        superseded: Callable[[Delivery, int], bool] | None = None,
        on_done: Callable[[Delivery], None] | None = None,
    ) -> None:
        """`lease` says which outcomes need their ownership checked before PostgreSQL is
        written (none while the lease is unbroken; all without one). `superseded(d, n)`
        says whether this process runs delivery `n` of `d`'s entry, newer than `d`.
        `on_done(delivery)` is called once an outcome's settlement is over (its entry
        acked, or left to its new holder), never while it waits to be re-sent."""
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._on_done = on_done
        # Waiting to be re-sent, by id() of what was handed over: (that, what is re-sent).
        self._later: dict[int, tuple[Result, Result]] = {}
        self._pool = pool
        self._cfg = config
        self._lease = lease
        self._superseded = superseded or (lambda d, n: False)
        self.stale = 0  # deliveries whose records were dropped: their entry was taken over
        self._pending: list[Start | Result] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down: set[str] = set()  # stores known to be unavailable
        self.settled = 0
        self._resends = 0  # round trips sent again (replicas did not confirm, scripts missing)
        self._flushing = 0
        self._batch: list[Start | Result] = []
        self._progress_at = time.time()
        self.has_room = asyncio.Event()  # cleared while the backlog is over max_backlog
        self.has_room.set()
        # Handlers' progress: the latest per job, written by the next flush.
        self.progress = ProgressBuffer(config.keys, config.progress_interval_s, self._wake.set)
        self._conn: PoolConnectionProxy | None = None

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
        items = (*self._batch, *self._pending, *(resend for _, resend in self._later.values()))
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
            try:
                while self._pending or self.progress.due:
                    try:
                        await self._flush_some()
                    except Exception:  # the flush loop outlives any one batch (settle never raises)
                        logger.exception("flush failed; its records are retried in 1s")
                        self._pending[:0] = self._batch  # back in front, in order
                        self._batch, self._flushing = [], 0
                        await asyncio.sleep(1.0)
            finally:
                await self._put_back()

    async def _connection(self) -> PoolConnectionProxy:
        """The connection this flush loop writes through, held while it has work: the
        pool would reset it (one more round trip) each time it came back."""
        if self._conn is None or self._conn.is_closed():
            await self._put_back()
            self._conn = await self._pool.acquire()
        return self._conn

    async def _put_back(self) -> None:
        """Return the held connection to the pool (reset once, for whoever takes it next)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._pool.release(conn)
            except _PG_ERRORS as exc:  # a broken connection: the pool replaces it
                logger.debug("releasing the recorder's connection failed: %s", exc)

    async def _flush_some(self) -> None:
        batch = self._pending[: self._cfg.max_batch]
        del self._pending[: len(batch)]
        self._flushing = len(batch)
        self._batch = batch
        batch = await self._drop_stale(batch)
        results = [item for item in batch if isinstance(item, Result)]
        jobs, execs = self._rows(batch)
        untold = {item.job_id for item in batch if _untold(item)}
        if untold:
            await self._find_created(untold, jobs, execs)
            jobs = _one_per_row(jobs)  # rows told apart by entry times may be one row after all
        if jobs or execs:
            fallen = await self._write_pg(jobs, execs)
            for item in batch:  # the payload is sent once per delivery, not per status
                item.delivery.payload_stored = True
            if fallen:
                jobs, results = _after_fallback(jobs, results, fallen)
        views = [_view_row(r) for r in results if r.view is not None]
        await self._write_redis(jobs + views, results)
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
        """One row per job row, a job id and its creation time (ON CONFLICT may touch a row
        once): the record that moves it furthest wins (newest delivery, then an outcome over
        `running`), so the batch is read newest first and a row's superseded records are not
        built at all. A job id published again as a new entry has a row of its own (another
        creation time): both of its entries' records are kept, each ends its own row.
        """
        rows: dict[tuple[str, float], JobRow] = {}
        execs: list[ExecRow] = []
        for item in reversed(batch):
            if isinstance(item, Result):
                if item.outcome is Outcome.SKIPPED:
                    continue
                if item.executed:
                    execs.append(_exec_row(item))
            key = (item.job_id, _created(item.delivery))
            have = rows.get(key)
            if have is None or _order(item) > _row_order(have):
                rows[key] = _start_row(item) if isinstance(item, Start) else _job_row(item)
        return list(rows.values()), execs

    async def _find_created(
        self, job_ids: set[str], jobs: list[JobRow], execs: list[ExecRow]
    ) -> None:
        """Give rows whose entry does not tell its job's creation time the time of the
        job's row in PostgreSQL, if it has one, so that they update it (rare path)."""
        found: dict[str, float] = {}

        async def find() -> None:
            nonlocal found
            found = await find_created(self._pool, sorted(job_ids))

        await retry_until_done(
            find, errors=_PG_ERRORS, what="PostgreSQL", down=self._down, log=logger
        )
        for row in jobs:
            row.created_at = found.get(row.id, row.created_at)
        for ex in execs:
            ex.created_at = found.get(ex.job_id, ex.created_at)

    async def _write_pg(
        self, jobs: list[JobRow], execs: list[ExecRow]
    ) -> dict[str, str | None] | None:
        """Commit the batch; after a refused batch, what `_write_pg_singly` could not keep."""
        fallen: dict[str, str | None] | None = None

        async def write() -> None:
            nonlocal fallen
            conn = await self._connection()
            try:
                try:
                    await write_batch(conn, self._cfg.worker_id, jobs, execs)
                except _DATA_ERRORS as exc:
                    logger.warning("batch refused by PostgreSQL (%s); writing jobs one by one",
                                   exc)  # fmt: skip
                    fallen = await self._write_pg_singly(conn, jobs, execs)
            except _PG_ERRORS:  # the connection may be broken: take another next time
                await self._put_back()
                raise

        # inv. 7: wait for PostgreSQL, acking nothing meanwhile.
        await retry_until_done(
            write, errors=_PG_ERRORS, what="PostgreSQL", down=self._down, log=logger
        )
        return fallen

    async def _write_pg_singly(
        self, conn: PoolConnectionProxy, jobs: list[JobRow], execs: list[ExecRow]
    ) -> dict[str, str | None]:
        """One bad row must not block the others: write each alone, degrading what it keeps.

        A row refused as it is loses its payload and result; refused again, it is stored in
        its minimal form (`failed`, why, no execution row), changed in place. Returns those
        job ids with their error, and the ids not even that could store with None: their
        entries must stay unacked (inv. 1).
        """
        fallen: dict[str, str | None] = {}
        for row in jobs:
            mine = [e for e in execs if e.job_id == row.id]
            try:
                await write_batch(conn, self._cfg.worker_id, [row], mine)
                continue
            except _DATA_ERRORS as exc:
                row.payload = None
                row.result = None
                why = _first_line(exc)
                row.error = f"{row.error or ''} (payload or result not storable: {why})".strip()
            try:
                await write_batch(conn, self._cfg.worker_id, [row], mine)
                continue
            except _DATA_ERRORS as exc:
                if row.status == Status.RUNNING:  # acks nothing; the outcome's row will tell
                    logger.warning("job %s not recorded running: %s", row.id, exc)
                    continue
                _minimal(row, exc)
            try:
                await write_batch(conn, self._cfg.worker_id, [row], [])
                logger.error("job %s recorded failed in minimal form: %s", row.id, row.error)
                fallen[row.id] = row.error
            except _DATA_ERRORS as exc:  # beyond storing: say so loudly, never ack it
                logger.error("job %s could not be recorded (%s): its entry %s stays unacked "
                             "and pending", row.id, exc, row.entry_id)  # fmt: skip
                fallen[row.id] = None
        return fallen

    async def _drop_stale(self, batch: list[Start | Result]) -> list[Start | Result]:
        """inv. 9: before PostgreSQL sees them, drop records of entries taken over while
        this replica's lease may have lapsed. One read-only round trip, and only then."""
        since = self._lease.held_since() if self._lease is not None else math.inf
        suspect = [item for item in batch if item.delivery.read_at < since]
        if not suspect:
            return batch
        by_queue: dict[str, list[Start | Result]] = {}
        for item in suspect:
            by_queue.setdefault(item.delivery.queue, []).append(item)
        cmds = [self._owned_cmd(q, items) for q, items in by_queue.items()]
        replies: list[object] = []

        async def ask() -> None:
            nonlocal replies
            replies = await self._send_scripts(cmds)

        await retry_until_done(ask, errors=REDIS_ERRORS, what="Redis", down=self._down, log=logger)
        gone: set[int] = set()
        for items, reply in zip(by_queue.values(), replies, strict=True):
            if isinstance(reply, Exception):  # cannot tell: keep them, settlement re-checks
                logger.warning("ownership check failed: %s", reply)
                continue
            told: set[int] = set()  # a delivery's `running` and outcome: one line
            for item, code in zip(items, reply, strict=True):  # type: ignore[call-overload]
                if not self._owned(item, int(code), quiet=id(item.delivery) in told):
                    gone.add(id(item))
                    told.add(id(item.delivery))
        if not gone:
            return batch
        self._release(item for item in batch if id(item) in gone)
        return [item for item in batch if id(item) not in gone]

    def _release(self, dropped: Iterable[Start | Result]) -> None:
        """Outcomes left to their entry's new holder: this process holds them no more."""
        if self._on_done is not None:
            for item in dropped:
                if isinstance(item, Result):
                    self._on_done(item.delivery)

    def _owned(self, item: Start | Result, code: int, *, quiet: bool = False) -> bool:
        """Whether a record still speaks for its entry, given the ownership `code`
        (`quiet`: another record of the same delivery was counted and logged already)."""
        d = item.delivery
        if code == 1:
            return True
        if code < 0 and not self._superseded(d, -code):
            d.delivery_count = -code  # ours, delivered again by Redis, run by no one else
            return True
        if quiet:
            return False
        self.stale += 1
        logger.warning(
            "stale attempt ignored job=%s queue=%s entry=%s: %s",
            item.job_id, d.queue, d.entry_id,
            "taken over by another replica" if code == 0 else "delivered again since",
        )  # fmt: skip
        return False

    def _owned_cmd(self, queue: str, items: list[Start | Result]) -> tuple[Any, ...]:
        args: list[Any] = [self._cfg.group, self._cfg.worker_id]
        for item in items:
            args += (item.delivery.entry_id, item.delivery.delivery_count)
        return ("EVALSHA", _OWNED[1], 1, self._cfg.keys.stream(queue), *args)

    async def _write_redis(self, jobs: list[JobRow], results: list[Result]) -> None:
        sends = 0

        async def send() -> None:
            nonlocal sends
            sends += 1
            await self._pipeline(jobs, results, resent=sends > 1)

        await retry_until_done(send, errors=REDIS_ERRORS, what="Redis", down=self._down, log=logger)

    async def _pipeline(
        self, jobs: list[JobRow], results: list[Result], *, resent: bool = False
    ) -> None:
        """One round trip: the job hashes, then one fenced settlement script per queue.

        Idempotent: re-sent after a lost reply, it finds its entries acked and its hashes
        written, and changes nothing (inv. 10). `resent`: a call before this one failed
        (it may have run, its reply lost).
        """
        cmds = self._hash_cmds(jobs) if jobs else []
        hashes = len(cmds)
        by_queue: dict[str, list[Result]] = {}
        for r in results:
            by_queue.setdefault(r.delivery.queue, []).append(r)
        cmds += [self._settle_cmd(q, rs) for q, rs in by_queue.items()]
        # Last, after the `running` writes of this flush; one per job on a cluster.
        progress = self.progress.take(_PROGRESS[1], per_job=self._cluster)
        cmds += progress
        if not cmds:
            return
        resends = self._resends
        replies = await self._send_scripts(cmds, wait=self._cfg.wait_replicas > 0)
        resent = resent or self._resends > resends  # sent again within (no replica, no script)
        replies = _without_progress(replies, len(progress))
        failed = [x for x in replies[:hashes] if isinstance(x, Exception)]
        if failed:  # inv. 2: a view; fails no job
            logger.warning("job hash write failed (%d of %d): %s", len(failed), hashes, failed[0])
        settled = replies[hashes:]
        retry: list[Result] = []
        for rs, reply in zip(by_queue.values(), settled, strict=True):
            retry += self._unsettled(rs, reply, resent)
        if retry:  # inv. 1: kept unacked; PostgreSQL already has them, so no second row
            for r in retry:
                self._settle_later(r)

    def _settle_later(self, r: Result) -> None:
        """Settle `r` again in 1 s; its entry stays held by this process meanwhile.

        `r` stays referenced until then, so no other Result takes its id().
        """
        self._later[id(r)] = (r, dataclasses.replace(r, executed=False))

        def again() -> None:
            _, resend = self._later.pop(id(r))
            self.settle(resend)

        asyncio.get_running_loop().call_later(1.0, again)

    def _unsettled(
        self, results: list[Result], reply: object, resent: bool = False
    ) -> list[Result]:
        """The outcomes a settle script's `reply` says must be sent again (`resent`: the
        script may have run before, its reply lost)."""
        if isinstance(reply, Exception):
            logger.error("settlement of %d outcomes refused: %s", len(results), reply)
            return results
        retry: list[Result] = []
        for r, code in zip(results, reply, strict=True):  # type: ignore[call-overload]
            if isinstance(code, bytes):  # its retry or dead letter was refused
                logger.error("settling job=%s refused: %s", r.job_id, code.decode())
                retry.append(r)
            elif int(code) < 0 and not self._superseded(r.delivery, -int(code)):
                r.delivery.delivery_count = -int(code)  # ours, delivered again: settle as it
                retry.append(r)
            elif int(code) == 2 and resent:
                # Fault: a lost reply. The call sent before acked the entry, and its reply
                # never came back: settled by it, not a stale attempt (nothing was taken
                # over; no warning, not counted in `stale`).
                logger.debug("job=%s settled by a call whose reply was lost", r.job_id)
            elif int(code) != 1:
                self._owned(r, min(int(code), 0))  # 0 or 2: counted and logged as stale
        return retry

    def _hash_cmds(self, jobs: list[JobRow]) -> list[tuple[Any, ...]]:
        """One script call for all job hashes on one server; on a cluster, where the hashes
        are spread over every slot, one call per job (a script touches one slot only)."""
        now = _iso(time.time())
        keys: list[str] = []
        args: list[Any] = []
        cmds: list[tuple[Any, ...]] = []
        for row in jobs:
            fields = self._hash_fields(row, now)
            terminal = row.status in TERMINAL
            one = (row.fence, 1 if row.status == Status.RUNNING else 2,
                   self._cfg.hash_ttl_s if terminal else 0, len(fields), *fields)  # fmt: skip
            if self._cluster:
                cmds.append(("EVALSHA", _SETHASH[1], 1, self._cfg.keys.job(row.id), *one))
            else:
                keys.append(self._cfg.keys.job(row.id))
                args += one
        if keys:
            cmds.append(("EVALSHA", _SETHASH[1], len(keys), *keys, *args))
        return cmds

    def _settle_cmd(self, queue: str, results: list[Result]) -> tuple[Any, ...]:
        keys = self._cfg.keys
        args: list[Any] = [self._cfg.group, self._cfg.worker_id]
        for r in results:
            d = r.delivery
            if r.outcome is Outcome.RETRYING and r.retry_at is not None:
                member = msgspec.json.encode(r.retry_fields)
                args += (d.entry_id, d.delivery_count, "r", int(r.retry_at * 1000), member)
            elif r.outcome is Outcome.FAILED:
                args += (d.entry_id, d.delivery_count, "d", 0, self._dead_letter(r))
            else:
                args += (d.entry_id, d.delivery_count, "a", 0, "")
        stream = keys.stream(queue)
        return ("EVALSHA", _SETTLE[1], 3, stream, keys.delayed(queue), keys.dead(queue), *args)

    def _dead_letter(self, r: Result) -> bytes:
        """The dead letter's fields as a flat JSON array (what the settle script XADDs)."""
        d = r.delivery
        fields = dead_fields(
            d.fields,
            queue=queue_of_part(d.queue),
            job_id=r.job_id,
            entry_id=d.entry_id,
            reason=r.reason or Reason.PERMANENT,  # every failed Result has its reason
            error=r.error or "",
            attempts=r.attempt,
            failed_at=r.finished_at or time.time(),
        )
        items = list(fields.items())
        if len(items) > _MAX_DEAD_FIELDS:  # the added fields come last: keep them
            dropped = len(items) - _MAX_DEAD_FIELDS
            items = [*items[: _MAX_DEAD_FIELDS - 8], *items[-7:], ("dropped_fields", dropped)]
        return msgspec.json.encode([as_text(x) for kv in items for x in kv])

    async def _send_scripts(
        self, cmds: list[tuple[Any, ...]], *, wait: bool = False
    ) -> list[object]:
        """Send EVALSHA commands in one round trip, loading the scripts when Redis lacks
        them (after a restart, a failover or SCRIPT FLUSH) and sending again: they are
        idempotent. `wait`: see `_send`."""
        replies = await self._send(cmds, wait)
        if any(isinstance(x, redis.exceptions.NoScriptError) for x in replies):
            scripts = (_SETTLE, _SETHASH, _OWNED, _PROGRESS)
            await load_scripts(self._redis, [body for body, _ in scripts])
            self._resends += 1
            replies = await self._send(cmds, wait)
        return replies

    async def _send(self, cmds: list[tuple[Any, ...]], wait: bool = False) -> list[object]:
        """Send commands in one round trip (per node, on a cluster); on one server packed
        by hiredis, which is much cheaper per job.

        `wait`: then wait for `wait_replicas` replicas. Once fewer confirmed, the writes are
        sent again after a second (all idempotent): across a failover they land on the
        new master if the old one died before passing them on. Not more often: a replica
        that is down must not stop settlement.
        """
        n = self._cfg.wait_replicas if wait else 0
        try:
            return await self._send_once(cmds, n)
        except NotReplicated as exc:
            logger.warning("settlement not confirmed by replicas (%s); sending it again", exc)
            self._resends += 1
            await asyncio.sleep(1.0)
            return await self._send_once(cmds, 0)

    async def _send_once(self, cmds: list[tuple[Any, ...]], replicas: int) -> list[object]:
        wait = (replicas, self._cfg.wait_timeout_ms)
        if isinstance(self._redis, RedisCluster):  # (narrows the type too)
            keys = [str(c[3]) for c in cmds if c[0] == "EVALSHA" and int(c[2]) > 0]
            async with asyncio.timeout(self._cfg.redis_timeout_s):
                return await send_many(self._redis, cmds, keys, wait)
        if replicas > 0:
            replies = await self._send_raw([*cmds, ("WAIT", *wait)])
            confirmed = replies.pop()
            if not isinstance(confirmed, int) or confirmed < replicas:
                raise NotReplicated(f"{confirmed} of {replicas} replicas confirmed the writes")
            return replies
        return await self._send_raw(cmds)

    async def _send_raw(self, cmds: list[tuple[Any, ...]]) -> list[object]:
        assert not isinstance(self._redis, RedisCluster)  # a cluster goes through send_many
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

    def _hash_fields(self, row: JobRow, now: str) -> list[Any]:
        out: list[Any] = ["status", row.status.encode(), "queue", row.queue,
                          "attempt", row.attempt, "worker_id", self._cfg.worker_id,
                          "updated_at", now,
                          "created_ms", round(row.created_at * 1000)]  # fmt: skip
        if row.started_at is not None:
            out += ("started_at", _iso(row.started_at))
        if row.status in TERMINAL:
            out += ("completed_at", _iso(row.completed_at), "result", row.result or "")
            out += ("error", row.error or "")
        elif row.status == Status.RETRYING:
            out += ("error", row.error or "")
        return out


def _without_progress(replies: list[object], n: int) -> list[object]:
    """The replies but the progress writes' (the last `n`), logged if one failed."""
    if n == 0:
        return replies
    failed = [x for x in replies[-n:] if isinstance(x, Exception)]
    if failed:  # a view, like the hash: fails no job
        logger.warning("job progress write failed: %s", failed[0])
    return replies[:-n]


def _order(item: Start | Result) -> tuple[str, bool]:
    """How far a record moves its job: delivery first, then an outcome over `running`."""
    return item.delivery.fence, isinstance(item, Result)


def _row_order(row: JobRow) -> tuple[str, bool]:
    """`_order` of the record a row was built from."""
    return row.fence, row.status != Status.RUNNING


def _one_per_row(jobs: list[JobRow]) -> list[JobRow]:
    """Of rows for the same job row (id and creation time), the one that moves it furthest."""
    rows: dict[tuple[str, float], JobRow] = {}
    for row in jobs:
        have = rows.get((row.id, row.created_at))
        if have is None or _row_order(row) > _row_order(have):
            rows[(row.id, row.created_at)] = row
    return list(rows.values())


def _start_row(item: Start) -> JobRow:
    d = item.delivery
    return JobRow(
        item.job_id, queue_of_part(d.queue), Status.RUNNING, _payload_text(item.payload), None,
        None, item.attempt, d.entry_id, _created(d), item.started_at, None, None, d.fence,
        item.trace_id,
    )  # fmt: skip


def _job_row(r: Result) -> JobRow:
    d = r.delivery
    done = r.finished_at if r.outcome is not Outcome.RETRYING else None
    # Once PostgreSQL has the payload (from the `running` row), the outcome's row leaves
    # it out: the upsert keeps the stored one, and the payload crosses the wire once.
    payload = None if d.payload_stored else _payload_text(r.payload)
    return JobRow(
        r.job_id, queue_of_part(d.queue), _STATUS[r.outcome], payload, r.result_json,
        clean_text(r.error), r.attempt, d.entry_id, _created(d), r.started_at or None, done,
        _time(r.retry_at), d.fence, r.trace_id,
    )  # fmt: skip


def _view_row(r: Result) -> JobRow:
    """The hash a SKIPPED delivery writes: PostgreSQL's terminal row, under its own fence
    (newer than the `running` a crashed holder may have left in the view)."""
    row: JobRow = r.view
    return JobRow(
        row.id, row.queue, row.status, None, row.result, row.error, row.attempt,
        row.entry_id, row.created_at, row.started_at, row.completed_at, None, r.delivery.fence,
    )  # fmt: skip


def _exec_row(r: Result) -> ExecRow:
    d = r.delivery
    return ExecRow(
        r.job_id, r.attempt, r.outcome.value, clean_text(r.error), r.duration_ms, r.started_at,
        r.finished_at, d.entry_id, d.delivery_count, _created(d),
    )  # fmt: skip


def _created(d: Delivery) -> float:
    """The job's creation time: its partition (carried by retries and replays, else the
    entry ID's time, clamped: an explicit ID may be past any storable time)."""
    return created_ms(d.entry_id, d.fields) / 1000.0


def _untold(item: Start | Result) -> bool:
    """Whether an entry may belong to a job created before it without saying when: an
    attempt above 1 without `created_ms` (a retry published before partitioning)."""
    return item.attempt > 1 and b"created_ms" not in item.delivery.fields


def _time(ts: float | None) -> float | None:
    """A time PostgreSQL and Python both hold: none for NaN, clamped to year 9999."""
    if ts is None or ts != ts:
        return None
    return min(max(ts, 0.0), _MAX_TIME_S)


def _first_line(exc: Exception) -> str:
    """PostgreSQL's message without its DETAIL and HINT lines: errors stay one line."""
    return str(exc).partition("\n")[0]


def _minimal(row: JobRow, exc: Exception) -> None:
    """Reduce a row PostgreSQL refuses to what always stores: id, queue, `failed`, why."""
    why = f"job could not be recorded ({_first_line(exc)}); its outcome was {row.status}: "
    why += row.error or ""
    row.status, row.error = Status.FAILED, clean_text(why[:4000])
    row.payload = row.result = None
    row.started_at = row.next_attempt_at = None
    row.completed_at = time.time()


def _after_fallback(
    jobs: list[JobRow], results: list[Result], fallen: dict[str, str | None]
) -> tuple[list[JobRow], list[Result]]:
    """After a refused batch: drop what was not recorded at all (never acked), and fail the
    results whose row could only be stored in its minimal `failed` form, so that their hash
    and dead letter agree with PostgreSQL."""
    kept = []
    for r in results:
        if r.job_id not in fallen:
            kept.append(r)
            continue
        error = fallen[r.job_id]
        if error is None:
            continue
        if r.outcome in (Outcome.COMPLETED, Outcome.RETRYING):
            r = dataclasses.replace(
                r, outcome=Outcome.FAILED, reason=Reason.UNRECORDABLE, error=error, retry_at=None
            )
        kept.append(r)
    return [row for row in jobs if fallen.get(row.id, "") is not None], kept

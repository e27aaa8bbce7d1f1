"""The engine runtime: groups, readers, dispatch with bounded concurrency, and the loops
that keep the invariants (heartbeat, reclaim, delayed promotion, trimming, drain).

Generic: it runs `Route`s and knows nothing of email.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from jobstream.otel import is_recording_enabled
from jobstream.schema.envelope import enqueued_at_ms, safe_job_id
from jobstream.streams.backoff import retry_until_done
from jobstream.streams.delayed import Promoter
from jobstream.streams.dispatch import (
    Route,
    execute,
    execute_traced,
    invalid_result,
    prepare,
    trace_invalid,
)
from jobstream.streams.heartbeat import heartbeat_value
from jobstream.streams.job import Delivery, Job, Result
from jobstream.streams.keys import Keys
from jobstream.streams.lease import Lease, clock
from jobstream.streams.observe import NullObserver, Observer
from jobstream.streams.pg_store import JobRow, fetch_statuses
from jobstream.streams.reclaimer import Pending, Reclaimer
from jobstream.streams.recorder import Recorder, RecorderConfig, Start
from jobstream.streams.status import TERMINAL, Reason
from jobstream.streams.trimmer import DeadLetterCaps, DeadLetterTrimmer, trim

__all__ = ["Engine", "EngineConfig"]

logger = logging.getLogger(__name__)
job_log = logging.getLogger("streams.jobs")
_CONN_ERRORS = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_STORE_ERRORS = (*_CONN_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    consumer: str
    keys: Keys = field(default_factory=Keys)
    group: str = "workers"
    block_ms: int = 1000
    read_count: int = 500
    max_deliveries: int = 5
    max_payload_bytes: int = 16 * 1024 * 1024
    alive_ttl_ms: int = 10_000
    reclaim_interval_s: float = 5.0
    reclaim_ceiling_ms: int = 3_600_000
    promote_interval_s: float = 0.25
    trim_interval_s: float = 10.0
    grace_s: float = 30.0
    hash_ttl_s: int = 7 * 24 * 3600
    dead_maxlen: int = 100_000
    dead_max_age_s: float = 30 * 86400
    dead_max_bytes: int = 256 * 1024 * 1024
    burst: bool = False


class _Lane:
    """One queue's dispatch: at most `policy.concurrency` handlers running, no pacing.

    A slot frees when its handler returns; settlement continues in the same task, so
    the recorder batches the outcomes of many more jobs than the concurrency.
    """

    def __init__(self, route: Route) -> None:
        self.route = route
        self.tasks: set[asyncio.Task[None]] = set()  # running or settling
        self.running: dict[str, Delivery] = {}  # holding a slot
        # inv. 10: every entry this process holds, from its read or claim until its ack
        # (queued, being checked, running, settling, waiting to be re-sent), with when it
        # was taken or last refreshed (perf_counter). Every path that runs an entry takes
        # it here first, so no entry runs twice in one process.
        self.held: dict[str, float] = {}
        # Taken over (resumed or reclaimed) and checked, waiting for a slot: they share
        # the lane's slots and backpressure with new reads, and go first.
        self.ready: deque[Delivery] = deque()
        self.reading = False  # between passing the gate and starting what it read
        self.free = asyncio.Event()
        self.free.set()

    @property
    def room(self) -> int:
        return self.route.policy.concurrency - len(self.running)

    def spawn(self, coro: Coroutine[Any, Any, None], d: Delivery) -> None:
        if d.entry_id in self.running:  # cannot happen while every path takes `held` first
            coro.close()
            logger.error("entry %s of %s is already running: not started twice",
                         d.entry_id, self.route.queue)  # fmt: skip
            return
        d.started_mono = time.perf_counter()
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        self.running[d.entry_id] = d
        if self.room <= 0:
            self.free.clear()
        task.add_done_callback(lambda t: self._done(t, d.entry_id))

    def release(self, entry_id: str) -> None:
        """The handler is done with its slot (its outcome may still be settling)."""
        if self.running.pop(entry_id, None) is not None:
            self.free.set()

    def _done(self, task: asyncio.Task[None], entry_id: str) -> None:
        self.tasks.discard(task)
        self.release(entry_id)


class Engine:
    """Runs routes against Redis Streams and records every outcome in PostgreSQL."""

    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        routes: Sequence[Route],
        config: EngineConfig,
        observer: Observer | None = None,
    ) -> None:
        self.redis, self.pool, self.cfg = redis, pool, config
        self.observer: Observer = observer or NullObserver()
        self.lanes = {r.queue: _Lane(r) for r in routes}
        self.lease = Lease(config.alive_ttl_ms / 1000)
        self.recorder = Recorder(
            redis,
            pool,
            RecorderConfig(
                group=config.group,
                worker_id=config.consumer,
                keys=config.keys,
                hash_ttl_s=config.hash_ttl_s,
                dead_maxlen=config.dead_maxlen,
            ),
            self.lease,
            self._superseded,
            on_done=self._let_go,
        )
        self.reclaimer = Reclaimer(
            redis, config.keys, config.group, config.consumer, config.reclaim_ceiling_ms
        )
        self.promoter = Promoter(redis, config.keys)
        caps = DeadLetterCaps(config.dead_max_age_s, config.dead_max_bytes, config.dead_maxlen)
        self.dead_trimmer = DeadLetterTrimmer(redis, config.keys, caps)
        self.stopping = asyncio.Event()
        self._exited = asyncio.Event()  # drained: the heartbeat may stop
        # Entries whose earlier deliveries may have crashed their worker, not claimed yet:
        # each is claimed and run alone (inv. 10, a poison job takes no healthy one with it).
        self._suspects: dict[tuple[str, str], Pending] = {}
        self._alone = asyncio.Event()  # cleared while a suspect waits for or has the worker
        self._alone.set()
        # Delivered this often (claimed once more), an entry runs alone: a worker that dies
        # running it then takes nothing else with it, and only its count reaches the limit.
        self._alone_from = min(3, config.max_deliveries)
        self.heartbeat_at = 0.0
        self.processed = 0
        self._traced = is_recording_enabled()
        self._attrs = {
            q: {
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": config.keys.stream(q),
                "messaging.consumer.group.name": config.group,
                "messaging.client.id": config.consumer,
            }
            for q in self.lanes
        }
        self._down: set[str] = set()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._refused: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        """Run until `stop()` (or, in burst mode, until the queues are drained), then drain."""
        await self._retrying("start", self._setup)
        if self.stopping.is_set():  # stopped before it could even start: nothing to drain
            logger.warning("stopped before the worker could start")
            return
        self.recorder.start()
        named = {f"read {q}": self._read_loop(lane) for q, lane in self.lanes.items()}
        named |= {
            "reclaim": self._every(self.cfg.reclaim_interval_s, self._reclaim, per_queue=True),
            "promote": self._every(self.cfg.promote_interval_s, self._promote, per_queue=True),
            "trim": self._every(self.cfg.trim_interval_s, self._trim, per_queue=True),
        }
        self._loops = {name: asyncio.create_task(coro, name=name) for name, coro in named.items()}
        loops = list(self._loops.values())
        # The heartbeat outlives `stopping`: a draining worker still holds its entries, and
        # another replica must not take them (or delete its consumer) before it exits.
        beat = asyncio.create_task(
            self._every(self.cfg.alive_ttl_ms / 3000, self._heartbeat, until=self._exited),
            name="heartbeat",
        )
        self._loops["heartbeat"] = beat
        try:
            await self.stopping.wait()
        finally:
            try:
                # Loops are not cancelled mid-command: each sees `stopping` within one
                # block_ms or interval, so no entry is read and then abandoned.
                _, stuck = await asyncio.wait(loops, timeout=self.cfg.block_ms / 1000 + 10)
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
                await self._drain()
            finally:
                self._exited.set()
                if not beat.done():
                    await asyncio.wait([beat], timeout=self.cfg.block_ms / 1000 + 10)
                    beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
                with contextlib.suppress(*_CONN_ERRORS):
                    await self.redis.delete(self.cfg.keys.alive(self.cfg.consumer))

    def health(self) -> str | None:
        """None while every loop runs and the heartbeat is fresh; otherwise what is wrong."""
        for name, task in self._loops.items():
            if task.done() and not self.stopping.is_set():
                exc = None if task.cancelled() else task.exception()
                return f"loop {name} stopped: {exc!r}"
        if not self.heartbeat_at:
            return "starting: no heartbeat yet"
        age = time.time() - self.heartbeat_at
        if age > self.cfg.alive_ttl_ms / 1000:
            return f"no heartbeat for {age:.0f}s (Redis unreachable or event loop blocked)"
        stalled = self.recorder.stalled_s()
        if stalled > 3 * self.cfg.alive_ttl_ms / 1000:
            return f"{self.recorder.backlog} outcomes not recorded for {stalled:.0f}s"
        return None

    def stop(self) -> None:
        """Stop reading; in-flight jobs get the grace period to finish."""
        self.stopping.set()
        self._alone.set()
        for lane in self.lanes.values():
            lane.free.set()

    async def _setup(self) -> None:
        for queue in self.lanes:
            try:
                await self.redis.xgroup_create(
                    self.cfg.keys.stream(queue), self.cfg.group, id="0", mkstream=True
                )
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            # Listed in the group from the start, even before anything is delivered to it.
            await self.redis.xgroup_createconsumer(
                self.cfg.keys.stream(queue), self.cfg.group, self.cfg.consumer
            )
        await self._heartbeat()
        for lane in self.lanes.values():  # a restarted worker resumes its own first
            await self._resume_own(lane)

    async def _drain(self) -> None:
        tasks = [t for lane in self.lanes.values() for t in lane.tasks]
        if tasks:
            logger.info("draining %d in-flight jobs (grace %.0fs)", len(tasks), self.cfg.grace_s)
            _, left = await asyncio.wait(tasks, timeout=self.cfg.grace_s)
            if left:
                ids = [d.entry_id for lane in self.lanes.values() for d in lane.running.values()]
                logger.warning(
                    "grace period over: %d jobs left pending for other workers: %s",
                    len(left),
                    ", ".join(ids[:20]),
                )
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
        waiting = sum(len(lane.ready) for lane in self.lanes.values())
        if waiting:
            logger.info("%d taken-over entries not started: left pending for other workers",
                        waiting)  # fmt: skip
        await self.recorder.close(self.cfg.grace_s)

    # ---- resilience helpers ----------------------------------------------------------
    async def _retrying(self, what: str, fn: Callable[[], Awaitable[None]]) -> bool:
        """Run `fn` until Redis and PostgreSQL let it succeed; True if it had to wait."""
        return await retry_until_done(
            fn, errors=_STORE_ERRORS, what=what, down=self._down, log=logger,
            stopping=self.stopping,
        )  # fmt: skip

    async def _every(
        self,
        interval_s: float,
        fn: Callable[..., Awaitable[None]],
        *,
        per_queue: bool = False,
        until: asyncio.Event | None = None,
    ) -> None:
        """Call `fn()` (`per_queue`: `fn(queue)` for each queue) every `interval_s` until
        `until` (default: `stopping`) is set. Nothing stops the loop but `until`."""
        until = until or self.stopping
        name = fn.__name__.strip("_")
        calls = [(f"{name} {q}", (q,)) for q in self.lanes] if per_queue else [(name, ())]
        while not until.is_set():
            for what, args in calls:
                try:
                    await self._retrying(what, functools.partial(fn, *args))
                    self._refused.discard(what)
                except Exception as exc:
                    # One of the sanctioned broad catches (a maintenance loop, like the flush
                    # loop): a refused command, a race or a bug in one queue's step must not
                    # stop the loop, nor the other queues' steps. Logged once until it works.
                    if what not in self._refused:
                        logger.exception("%s failed: %s (logged once until it works again)",
                                         what, exc)  # fmt: skip
                        self._refused.add(what)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), interval_s)

    # ---- reading and dispatch ---------------------------------------------------------
    async def _read_loop(self, lane: _Lane) -> None:
        stream = self.cfg.keys.stream(lane.route.queue)
        while True:
            await lane.free.wait()
            await self.recorder.has_room.wait()  # backpressure: bounded settlement backlog
            await self._alone.wait()  # a suspect entry is about to run alone
            if self.stopping.is_set():
                return
            if lane.ready or lane.room <= 0:  # (a suspect may have run alone meanwhile)
                while lane.ready and lane.room > 0:
                    d = lane.ready.popleft()
                    lane.spawn(self._process(lane, d), d)
                continue
            count = max(1, min(lane.room, self.cfg.read_count))
            reply: Any = []

            async def read(count: int = count) -> None:
                nonlocal reply
                reply = await self.redis.xreadgroup(
                    self.cfg.group,
                    self.cfg.consumer,
                    {stream: ">"},
                    count=count,
                    block=self.cfg.block_ms,
                )

            lane.reading = True
            try:
                waited = await self._retrying(f"read {stream}", read)
                entries = reply[0][1] if reply else []
                self._run_read(lane, entries)  # taken before anything else can look
                if waited:  # a lost reply may have delivered entries we never saw
                    await self._retrying(f"resume {stream}", lambda: self._resume_own(lane))
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._retrying("start", self._setup)  # stream or group deleted
                else:  # refused (e.g. out of memory): say so, wait, try again
                    logger.error("reading %s refused: %s; retrying in 1s", stream, exc)
                    await asyncio.sleep(1.0)
                continue
            finally:
                lane.reading = False
            if not entries and self.cfg.burst and await self._drained():
                self.stop()

    def _run_read(self, lane: _Lane, entries: list[Any]) -> None:
        """Take and start new entries just read (never delivered before, so never held)."""
        held, queue, now = lane.held, lane.route.queue, time.perf_counter()
        for eid, fields in entries:
            entry_id = eid.decode()
            if entry_id in held:
                continue
            held[entry_id] = now
            d = Delivery(queue, entry_id, fields)
            lane.spawn(self._process(lane, d), d)

    def _let_go(self, d: Delivery) -> None:
        """The recorder is done with `d`: this process no longer holds its entry."""
        lane = self.lanes.get(d.queue)
        if lane is not None:
            lane.held.pop(d.entry_id, None)

    async def _resume_own(self, lane: _Lane, idle_ms: int | None = None) -> None:
        """Run the entries our consumer name holds that this process does not hold.

        At start, what a previous process of the same name left; after a dropped
        connection, a read that was delivered to us with its reply lost. Either would
        otherwise wait for the safety ceiling. `idle_ms`: only entries idle that long.
        """
        after = "-"
        while True:
            batch = await self.reclaimer.pending(
                lane.route.queue, self.cfg.consumer, after=after, idle_ms=idle_ms
            )
            await self._take_over(lane, batch)
            if len(batch) < self.reclaimer.batch:
                return
            after = batch[-1].entry_id

    async def _take_over(self, lane: _Lane, batch: list[Pending]) -> None:
        """Claim pending entries of one consumer that this process does not hold, and run
        them. They are held from before the claim, so no other path can take them too."""
        held, now, queue = lane.held, time.perf_counter(), lane.route.queue
        mine = []
        for p in batch:
            if p.entry_id in held or (queue, p.entry_id) in self._suspects:
                continue
            if self._alone_from <= p.deliveries + 1 <= self.cfg.max_deliveries:
                self._suspects[(queue, p.entry_id)] = p  # claimed later, alone
            else:
                mine.append(p)
        if not mine:
            return
        for p in mine:
            held[p.entry_id] = now
        got: list[Delivery] = []
        try:
            got = await self.reclaimer.claim(lane.route.queue, mine[0].owner, mine)
        finally:
            taken = {d.entry_id for d in got}
            for p in mine:
                if p.entry_id not in taken:  # not claimed: another path may take it later
                    held.pop(p.entry_id, None)
        if got and mine[0].owner == self.cfg.consumer:
            logger.warning("resuming %d entries this consumer already held", len(got))
        if got:
            await self._dispatch_redelivered(lane, got)

    async def _drained(self) -> bool:
        """Burst mode: nothing new was read; is anything else ready for this worker?

        Jobs and retries due later are not ready: they stay for the next run.
        """
        busy = any(lane.tasks or lane.ready for lane in self.lanes.values())
        if busy or self._suspects or self.recorder.backlog:
            return False
        now_ms = int(time.time() * 1000)
        try:
            for queue in self.lanes:
                if await self.redis.zcount(self.cfg.keys.delayed(queue), "-inf", now_ms):
                    return False
                mine = await self.redis.xpending_range(
                    self.cfg.keys.stream(queue), self.cfg.group, "-", "+", 1, self.cfg.consumer
                )
                if mine:
                    return False
        except redis.exceptions.RedisError:
            return False
        return True

    async def _run_suspects(self) -> None:
        """Claim and run each suspect entry alone: no new entry starts in this process
        until it is the only one running, and none until its handler is done.

        Slow for the rare entries it applies to, and the cost of isolating a poison job:
        the healthy jobs that died with it run to completion instead of sharing its fate.
        """
        while self._suspects and not self.stopping.is_set():
            (queue, entry_id), p = next(iter(self._suspects.items()))
            del self._suspects[(queue, entry_id)]
            lane = self.lanes[queue]
            if entry_id in lane.held:
                continue
            self._alone.clear()
            try:
                if not await self._idle():
                    return
                lane.held[entry_id] = time.perf_counter()
                got: list[Delivery] = []
                try:
                    got = await self.reclaimer.claim(queue, p.owner, [p])
                finally:
                    if not got:  # another replica took it, or it was acked or deleted
                        lane.held.pop(entry_id, None)
                if got:
                    logger.warning(
                        "running entry %s of %s alone: delivered %d times, an earlier "
                        "delivery may have crashed its worker",
                        entry_id, queue, got[0].delivery_count,
                    )  # fmt: skip
                    await self._dispatch_redelivered(lane, got, alone=True)
                    await self._idle()
            finally:
                self._alone.set()

    async def _idle(self) -> bool:
        """Wait until no handler runs and no read is being started; False if stopping."""
        lanes = self.lanes.values()
        while any(lane.running or lane.reading for lane in lanes):
            if self.stopping.is_set():
                return False
            await asyncio.sleep(0.01)  # rare path: a poll is simpler than another event
        return not self.stopping.is_set()

    async def _dispatch_redelivered(
        self, lane: _Lane, batch: list[Delivery], *, alone: bool = False
    ) -> None:
        """Entries delivered before, held by this process: ack those PostgreSQL shows
        completed (inv. 3) or failed, run the rest (`alone`: at once, the worker is idle)."""
        ids = [safe_job_id(d.entry_id, d.fields) for d in batch]
        statuses: dict[str, JobRow] | None = None

        async def fetch() -> None:
            nonlocal statuses
            statuses = await fetch_statuses(self.pool, ids)

        await self._retrying("check redelivered", fetch)
        if statuses is None:  # stopping before PostgreSQL answered: left for other workers
            return
        for job_id, d in zip(ids, batch, strict=True):
            row = statuses.get(job_id)
            # Over: its outcome is recorded (failed: dead-lettered when it was recorded).
            if row is not None and row.status in TERMINAL:
                # a crash between commit and hash may have left the hash `running`
                self._settle(Result.skipped(d, job_id, row, time.time()))
            elif d.delivery_count > self.cfg.max_deliveries:
                res = invalid_result(
                    d,
                    f"delivered {d.delivery_count} times, more than max_deliveries "
                    f"{self.cfg.max_deliveries}: the job keeps crashing its worker",
                    reason=Reason.DELIVERIES,
                )
                self._settle(res)
            elif alone:
                lane.spawn(self._process(lane, d), d)
            else:
                lane.ready.append(d)  # the read loop starts it when a slot is free

    async def _process(self, lane: _Lane, d: Delivery) -> None:
        route = lane.route
        prepared = prepare(route, d, self.cfg.max_payload_bytes)
        if isinstance(prepared, Result):
            lane.release(d.entry_id)
            if self._traced:
                trace_invalid(prepared, self._attrs[route.queue])
            job_log.warning(
                "job invalid job=%s queue=%s error=%s", prepared.job_id, route.queue, prepared.error
            )
            self._settle(prepared)
            return
        env, payload = prepared
        job = Job(
            env.job_id,
            route.queue,
            env.attempt,
            d.entry_id,
            enqueued_at_ms(d.entry_id),
            d.delivery_count,
            env.traceparent,
        )
        self.recorder.started(Start(d, job.id, job.attempt, env.payload, time.time()))
        self.observer.job_started(route.queue)
        if self._traced:

            def around(res: Result | None) -> None:
                self._log_job(job, res)

            res = await execute_traced(
                route, env, payload, job, d, self._attrs[route.queue], around
            )
        else:
            self._log_job(job, None)
            res = await execute(route, env, payload, job, d)
            self._log_job(job, res)
        lane.release(d.entry_id)
        self._settle(res)

    @staticmethod
    def _log_job(job: Job, res: Result | None) -> None:
        """One line when a job starts and one when it ends (inside its span, if traced)."""
        if not job_log.isEnabledFor(logging.INFO):
            return
        fields = {"job": job.id, "queue": job.queue, "attempt": job.attempt}
        if res is None:
            job_log.info("job started job=%s queue=%s attempt=%d", job.id, job.queue, job.attempt,
                         extra=fields)  # fmt: skip
            return
        fields.update(outcome=res.outcome.value, duration_ms=res.duration_ms)
        if res.error:
            fields["error"] = res.error
        job_log.info(
            "job %s job=%s queue=%s attempt=%d duration_ms=%d%s",
            res.outcome.value,
            job.id,
            job.queue,
            job.attempt,
            res.duration_ms,
            f" error={res.error}" if res.error else "",
            extra=fields,
        )

    def _settle(self, res: Result) -> None:
        # inv. 1: once handed over, the recorder commits then acks it, even while stopping.
        self.recorder.settle(res)
        self.processed += 1
        if not res.executed:  # invalid or already done: counted, with no handler run
            self.observer.job_started(res.delivery.queue)
        self.observer.job_finished(res.delivery.queue, res.outcome.value, res.duration_ms / 1000)

    def _superseded(self, d: Delivery, count: int) -> bool:
        """Whether this process runs delivery `count` (or later) of `d`'s entry, not `d`."""
        lane = self.lanes.get(d.queue)
        other = lane.running.get(d.entry_id) if lane is not None else None
        return other is not None and other is not d and other.delivery_count >= count

    # ---- maintenance loops ------------------------------------------------------------
    def _beat(self) -> bytes:
        """The heartbeat's value: when, which process, and how much it runs now (read by
        `jobstream workers`; other readers only ask whether the key exists)."""
        lanes = self.lanes.values()
        return heartbeat_value(
            at=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            queues=sorted(self.lanes),
            in_flight=sum(len(lane.running) for lane in lanes),
        )

    async def _heartbeat(self) -> None:
        sent_at = clock()  # the key's TTL starts when Redis runs the SET, after this
        await self.redis.set(
            self.cfg.keys.alive(self.cfg.consumer), self._beat(), px=self.cfg.alive_ttl_ms
        )
        self.lease.renewed(sent_at)
        self.heartbeat_at = time.time()
        # inv. 4: whatever this process holds (running, or its outcome waiting in the
        # recorder, e.g. through a PostgreSQL outage) is kept fresh so the ceiling never
        # hands it to another replica.
        long_s = self.cfg.reclaim_ceiling_ms / 2000
        for queue, lane in self.lanes.items():
            now = time.perf_counter()
            old = [eid for eid, at in lane.held.items() if now - at > long_s]
            for i in range(0, len(old), 500):
                chunk = old[i : i + 500]
                kept = await self.reclaimer.refresh(queue, chunk)
                for eid in chunk:
                    if eid in lane.held:
                        lane.held[eid] = now
                if len(kept) < len(chunk):
                    logger.warning("%d entries of %s were taken over by another consumer",
                                   len(chunk) - len(kept), queue)  # fmt: skip

    async def _reclaim(self, queue: str) -> None:
        lane = self.lanes[queue]
        for name in await self.reclaimer.dead_consumers(queue):
            await self._take_over(lane, await self.reclaimer.pending(queue, name))
        # Delivered to us with the reply lost inside the client's own retry.
        await self._resume_own(lane, idle_ms=self.cfg.alive_ttl_ms)
        claimed = await self.reclaimer.claim_ceiling(queue)
        held, now = lane.held, time.perf_counter()
        fresh = [d for d in claimed if d.entry_id not in held]
        for d in fresh:
            held[d.entry_id] = now
        if fresh:
            await self._dispatch_redelivered(lane, fresh)
        await self._run_suspects()

    async def _promote(self, queue: str) -> None:
        await self.promoter.promote(queue)

    async def _trim(self, queue: str) -> None:
        await trim(self.redis, self.cfg.keys, queue)
        for cap, n in (await self.dead_trimmer.trim(queue)).items():
            self.observer.dead_letters_dropped(queue, cap, n)
        stream = self.cfg.keys.stream(queue)
        groups: Any = await self.redis.xinfo_groups(stream)
        ours = self.cfg.group.encode()
        for g in groups:
            if g["name"] == ours:  # compared as bytes: a group name need not be UTF-8
                dead = int(await self.redis.xlen(self.cfg.keys.dead(queue)))
                self.observer.queue_stats(queue, int(g["pending"]), int(g.get("lag") or 0), dead)

"""The engine runtime: groups, readers, dispatch with bounded concurrency, and the loops
that keep the invariants (heartbeat, reclaim, delayed promotion, trimming, drain).

Generic: it runs `Route`s and knows nothing of email.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
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
import redis.exceptions

from jobstream.otel import is_recording_enabled, trace_id_of
from jobstream.otel.suppress import instrumented_context, suppressed
from jobstream.schema.envelope import (
    Envelope,
    created_ms,
    enqueued_at_ms,
    safe_job_id,
    trace_context,
)
from jobstream.streams import semconv as sc
from jobstream.streams.backoff import retry_until_done
from jobstream.streams.batch import Item, execute_batch, execute_batch_traced
from jobstream.streams.cancel import CancelWatch
from jobstream.streams.delayed import Promoter
from jobstream.streams.dispatch import (
    Route,
    cancelled_result,
    execute,
    execute_traced,
    invalid_result,
    prepare,
    trace_invalid,
)
from jobstream.streams.gauges import QueueGauges
from jobstream.streams.heartbeat import heartbeat_value
from jobstream.streams.job import Delivery, Job, Result
from jobstream.streams.keys import Keys, base_queue, level_of, level_queue, queue_of_part
from jobstream.streams.lease import Lease, clock
from jobstream.streams.levels import Slots, WeightedOrder
from jobstream.streams.observe import NullObserver, Observer
from jobstream.streams.partitions import PartitionPolicy, PrunePlan, maintain
from jobstream.streams.pg_store import JobRow, fetch_statuses
from jobstream.streams.queue_partitions import parts_of, register
from jobstream.streams.reclaimer import Pending, Reclaimer
from jobstream.streams.recorder import Recorder, RecorderConfig, Start
from jobstream.streams.redis_client import REDIS_ERRORS, AnyRedis
from jobstream.streams.status import TERMINAL, Outcome, Reason
from jobstream.streams.trimmer import DeadLetterCaps, DeadLetterTrimmer, trim

__all__ = ["Engine", "EngineConfig"]

logger = logging.getLogger(__name__)
job_log = logging.getLogger("streams.jobs")
_CONN_ERRORS = REDIS_ERRORS
_STORE_ERRORS: tuple[type[BaseException], ...] = (
    *_CONN_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


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
    progress_interval_s: float = 1.0
    partitions: PartitionPolicy | None = field(default_factory=PartitionPolicy)
    """Time partitions of the job tables, made ahead and pruned daily; None: left alone."""
    wait_replicas: int = 0  # settlement waits for this many replicas to confirm
    wait_timeout_ms: int = 1000


class _Lane:
    """One queue's dispatch: at most `policy.concurrency` handlers running, no pacing.

    A slot frees when its handler returns; settlement continues in the same task, so
    the recorder batches the outcomes of many more jobs than the concurrency.
    """

    def __init__(
        self,
        route: Route,
        name: str | None = None,
        concurrency: int = 0,
        slots: Slots | None = None,
    ) -> None:
        self.route = route
        # The stream this lane reads, named as a queue: a partition (`q`, `q#1`, ...) or a
        # priority level (`level_queue`); its Redis keys.
        self.name = name or route.queue
        # Shared by a queue's levels; a partition has its own share.
        self.slots = slots or Slots(concurrency or route.policy.concurrency)
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
        self.free = self.slots.free
        # A batch handler's next batch, filling up (its jobs hold their slots already),
        # and the timer that runs it when the policy's wait is over before it is full.
        self.batch: list[Item] = []
        self.timer: asyncio.TimerHandle | None = None
        self.batch_size = min(route.policy.batch_size, route.policy.concurrency)
        self.context: contextvars.Context | None = None  # where jobs run (instrumentation on)

    @property
    def room(self) -> int:
        return self.slots.room

    def spawn(self, coro: Coroutine[Any, Any, None], d: Delivery) -> None:
        if d.entry_id in self.running:  # cannot happen while every path takes `held` first
            coro.close()
            logger.error("entry %s of %s is already running: not started twice",
                         d.entry_id, self.route.queue)  # fmt: skip
            return
        d.started_mono = time.perf_counter()
        if self.context is None:
            task = asyncio.ensure_future(coro)
        else:
            task = asyncio.get_running_loop().create_task(coro, context=self.context.copy())
        d.task = task  # timed by the watchdog (`Engine._watch`)
        self.tasks.add(task)
        self.running[d.entry_id] = d
        self.slots.take()
        task.add_done_callback(lambda t: self._done(t, d.entry_id))

    def hold(self, d: Delivery) -> None:
        """`d` takes a slot while it waits in the batch that fills up."""
        d.started_mono = time.perf_counter()
        self.running[d.entry_id] = d
        self.slots.take()

    def spawn_batch(self, coro: Coroutine[Any, Any, None], items: list[Item]) -> None:
        """Run a batch whose jobs hold their slots (`hold`) until its task is done."""
        if self.context is None:
            task = asyncio.ensure_future(coro)
        else:
            task = asyncio.get_running_loop().create_task(coro, context=self.context.copy())
        self.tasks.add(task)
        if len(items) == 1:  # run alone (`Engine._run_one`): timed by the watchdog
            items[0].delivery.task = task

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            for it in items:
                self.release(it.delivery.entry_id)

        task.add_done_callback(done)

    def release(self, entry_id: str) -> None:
        """The handler is done with its slot (its outcome may still be settling)."""
        if self.running.pop(entry_id, None) is not None:
            self.slots.give()

    def _done(self, task: asyncio.Task[None], entry_id: str) -> None:
        self.tasks.discard(task)
        self.release(entry_id)


class Engine:
    """Runs routes against Redis Streams and records every outcome in PostgreSQL."""

    def __init__(
        self,
        redis: AnyRedis,
        pool: asyncpg.Pool,
        routes: Sequence[Route],
        config: EngineConfig,
        observer: Observer | None = None,
    ) -> None:
        self.redis, self.pool, self.cfg = redis, pool, config
        self.observer: Observer = observer or NullObserver()
        self.routes = {r.queue: r for r in routes}
        self.lanes: dict[str, _Lane] = {}  # by partition, or level of a queue with priorities
        self._levels: list[tuple[list[_Lane], WeightedOrder]] = []
        for r in routes:
            if not r.policy.priorities:
                for n in range(r.policy.partitions):
                    self._add_lane(r, n)
                continue
            slots, group, weights = Slots(r.policy.concurrency), [], []
            for level, weight in r.policy.levels():
                lane = _Lane(r, level_queue(r.queue, level), slots=slots)
                self.lanes[lane.name] = lane
                group.append(lane)
                weights.append(weight)
            self._levels.append((group, WeightedOrder(weights)))
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
                progress_interval_s=config.progress_interval_s,
                wait_replicas=config.wait_replicas,
                wait_timeout_ms=config.wait_timeout_ms,
            ),
            self.lease,
            self._superseded,
            on_done=self._let_go,
        )
        self.reclaimer = Reclaimer(
            redis, config.keys, config.group, config.consumer, config.reclaim_ceiling_ms
        )
        self.promoter = Promoter(redis, config.keys)
        self.cancels = CancelWatch(redis, config.keys)
        self._jobs: dict[str, tuple[Delivery, asyncio.Task[Any]]] = {}  # running, by job id
        caps = DeadLetterCaps(config.dead_max_age_s, config.dead_max_bytes, config.dead_maxlen)
        self.dead_trimmer = DeadLetterTrimmer(redis, config.keys, caps)
        gauge_ttl_ms = int(config.trim_interval_s * 2500)  # survives one missed report
        self.gauges = QueueGauges(redis, config.keys, config.group, config.consumer, gauge_ttl_ms)
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
        server = sc.server_attributes(redis)
        self._attrs = {
            q: {
                sc.SYSTEM: "redis",
                sc.OPERATION_NAME: "process",
                sc.OPERATION_TYPE: "process",
                sc.DESTINATION: config.keys.stream(q),
                sc.CONSUMER_GROUP: config.group,
                sc.CLIENT_ID: config.consumer,
                **server,
            }
            for q in self.routes
        }
        self.observer.serving({q: config.keys.stream(q) for q in self.lanes}, config.group)
        self._down: set[str] = set()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._refused: set[str] = set()
        self.prunes: list[PrunePlan] = []  # the retention runs this replica applied

    def _add_lane(self, route: Route, n: int) -> _Lane:
        """A lane for partition `n` of the route's queue; a queue's partitions share its
        concurrency (each gets an equal share, at least 1)."""
        name = self.cfg.keys.part(route.queue, n)
        lane = self.lanes.get(name)
        if lane is None:
            share = -(-route.policy.concurrency // route.policy.partitions)
            lane = self.lanes[name] = _Lane(route, name, max(1, share))
        return lane

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        """Run until `stop()` (or, in burst mode, until the queues are drained), then drain.

        The engine's own commands run with auto-instrumentation suppressed (no root span
        per poll); each job turns it on again for its handler.
        """
        jobs = instrumented_context()  # the handler's SQL and Redis calls nest under its span
        for lane in self.lanes.values():
            lane.context = jobs
        with suppressed():
            await self._run()

    async def _run(self) -> None:
        await self._retrying("start", self._setup)
        if self.stopping.is_set():  # stopped before it could even start: nothing to drain
            logger.warning("stopped before the worker could start")
            return
        self.recorder.start()
        grouped = {lane.name for group, _ in self._levels for lane in group}
        named = {
            f"read {q}": self._read_loop(lane) for q, lane in self.lanes.items() if q not in grouped
        }
        named |= {
            f"read {group[0].route.queue}": self._read_levels(group, order)
            for group, order in self._levels
        }
        named |= {
            "stream partitions": self._every(self.cfg.reclaim_interval_s, self._stream_partitions),
            "reclaim": self._every(self.cfg.reclaim_interval_s, self._reclaim, per_queue=True),
            "promote": self._every(self.cfg.promote_interval_s, self._promote, per_queue=True),
            "trim": self._every(self.cfg.trim_interval_s, self._trim, per_queue=True),
        }
        if self.cfg.partitions is not None:
            every = self.cfg.partitions.check_interval_s
            named["table partitions"] = self._every(every, self._table_partitions)
        self._loops = {name: asyncio.create_task(coro, name=name) for name, coro in named.items()}
        for task in self._loops.values():
            task.add_done_callback(self._loop_ended)
        # The heartbeat outlives `stopping`: a draining worker still holds its entries, and
        # another replica must not take them (or delete its consumer) before it exits.
        beat = asyncio.create_task(
            self._every(self.cfg.alive_ttl_ms / 3000, self._heartbeat, until=self._exited),
            name="heartbeat",
        )
        self._loops["heartbeat"] = beat
        # Like the heartbeat, the watchdog outlives `stopping`: draining jobs keep their timeouts.
        watch = asyncio.create_task(self._watch(), name="watch")
        self._loops["watch"] = watch
        try:
            await self.stopping.wait()
        finally:
            # The heartbeat and the watchdog run on through the drain (they end with it).
            loops = [t for name, t in self._loops.items() if name not in ("heartbeat", "watch")]
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
                await asyncio.gather(watch, return_exceptions=True)
                with contextlib.suppress(*_CONN_ERRORS):
                    await self.redis.delete(self.cfg.keys.alive(self.cfg.consumer))
                    await self.gauges.release()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """Say so at once when a loop ends before `stop()` (health() reports it too)."""
        if not task.cancelled() and task.exception() is not None and not self.stopping.is_set():
            logger.error("loop %s stopped: %r", task.get_name(), task.exception())

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
        for route in self.routes.values():
            await register(self.redis, self.cfg.keys, route.queue, route.policy.partitions)
            for part in await parts_of(self.redis, self.cfg.keys, route.queue):
                self._add_lane(route, int(part.partition("#")[2] or 0))
        for queue in self.lanes:
            await self._join(queue)
        await self._heartbeat()
        # Cancellations requested before it started: none may run (one stream per queue,
        # whatever its levels or partitions).
        for queue in dict.fromkeys(base_queue(q) for q in self.lanes):
            await self.cancels.poll(queue)
        for lane in self.lanes.values():  # a restarted worker resumes its own first
            await self._resume_own(lane)

    async def _join(self, queue: str) -> None:
        """Create the group of a lane's stream (an existing one is fine) and join it."""
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

    async def _stream_partitions(self) -> None:
        """Read partitions used since start-up too (a publisher with a higher `partitions`,
        or one that used to have it): entries are never left in a partition nobody reads."""
        for route in self.routes.values():
            for part in await parts_of(self.redis, self.cfg.keys, route.queue):
                if part in self.lanes or self.stopping.is_set():
                    continue
                await self._join(part)
                lane = self._add_lane(route, int(part.partition("#")[2]))
                logger.info("reading partition %s too", part)
                await self._resume_own(lane)
                name = f"read {part}"
                self._loops[name] = asyncio.create_task(self._read_loop(lane), name=name)

    async def _drain(self) -> None:
        for lane in self.lanes.values():  # a batch filling up runs now, with what it has
            if lane.batch:
                self._fire(lane)
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
        while not until.is_set():
            # Lanes may be added as partitions appear: list them on every round.
            calls = [(f"{name} {q}", (q,)) for q in list(self.lanes)] if per_queue else [(name, ())]
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
        stream = self.cfg.keys.stream(lane.name)
        what = f"read {stream}"
        delay, lost = 0.1, False  # lost: a read failed in a way that may have lost its reply
        while True:
            await lane.free.wait()
            await self.recorder.has_room.wait()  # backpressure: bounded settlement backlog
            await self._alone.wait()  # a suspect entry is about to run alone
            if self.stopping.is_set():
                return
            if lane.ready or lane.room <= 0:  # (a suspect may have run alone meanwhile)
                while lane.ready and lane.room > 0:
                    self._start(lane, lane.ready.popleft())
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
                waited = await self._retrying(what, read)
                entries = reply[0][1] if reply else []
                self._run_read(lane, entries)  # taken before anything else can look
                if waited or lost:  # a lost reply may have delivered entries we never saw
                    await self._retrying(f"resume {stream}", lambda: self._resume_own(lane))
                    lost = False
            except redis.exceptions.ResponseError as exc:
                await self._read_refused(stream, exc)
                continue
            except Exception as exc:
                # One of the sanctioned broad catches (the read loop, like the flush loop):
                # during a cluster failover the cluster client can fail a command with an
                # error that is no Redis error (a connection it closed under the command:
                # AttributeError on its writer). Ending here would leave this worker
                # alive, holding what it took, and never starting anything again.
                self._read_failed(what, exc)
                lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            finally:
                lane.reading = False
            self._read_works(what)
            delay = 0.1
            if not entries and self.cfg.burst and await self._drained():
                self.stop()

    async def _read_refused(self, stream: str, exc: redis.exceptions.ResponseError) -> None:
        if "NOGROUP" in str(exc):
            await self._retrying("start", self._setup)  # stream or group deleted
        else:  # refused (e.g. out of memory): say so, wait, try again
            logger.error("reading %s refused: %s; retrying in 1s", stream, exc)
            await asyncio.sleep(1.0)

    def _read_failed(self, what: str, exc: Exception) -> None:
        """Log a read that failed unforeseen (with its traceback) once until one works."""
        if what not in self._refused:
            logger.exception("%s failed: %s; reading again with backoff up to 5s", what, exc)
            self._refused.add(what)

    def _read_works(self, what: str) -> None:
        """A read worked: say so if one had failed unforeseen before it."""
        if what in self._refused:
            logger.warning("%s reads again", what)
            self._refused.discard(what)

    def _run_read(self, lane: _Lane, entries: list[Any]) -> None:
        """Take and start new entries just read (never delivered before, so never held)."""
        held, queue, now = lane.held, lane.name, time.perf_counter()
        for eid, fields in entries:
            entry_id = eid.decode()
            if entry_id in held:
                continue
            held[entry_id] = now
            d = Delivery(queue, entry_id, fields)
            if lane.room > 0:
                self._start(lane, d)
            else:  # a blocking read of several levels may bring one more than there is room
                lane.ready.append(d)

    async def _read_levels(self, lanes: list[_Lane], order: WeightedOrder) -> None:
        """The read loop of a queue with priority levels (`lanes`, highest first): free
        slots go to the levels in `order`, and what a level with nothing waiting leaves
        goes to the highest that has more. Idle, it blocks on all of them at once."""
        slots = lanes[0].slots
        while True:
            await slots.free.wait()
            await self.recorder.has_room.wait()
            await self._alone.wait()
            if self.stopping.is_set():
                return
            if slots.room <= 0 or any(lane.ready for lane in lanes):
                for lane in lanes:  # taken over, or read beyond the room: highest first
                    while lane.ready and slots.room > 0:
                        d = lane.ready.popleft()
                        self._start(lane, d)
                continue
            got = await self._read_levels_guarded(lanes, order)
            if not got and self.cfg.burst and await self._drained():
                self.stop()

    async def _read_levels_guarded(self, lanes: list[_Lane], order: WeightedOrder) -> int:
        """`_read_levels_once` through outages (inv. 7, 10), as `_read_loop` reads."""
        name, got = lanes[0].route.queue, 0

        async def read() -> None:
            nonlocal got
            got = await self._read_levels_once(lanes, order)

        for lane in lanes:
            lane.reading = True
        try:
            if await self._retrying(f"read {name}", read):  # replies may have been lost
                for lane in lanes:
                    await self._retrying(
                        f"resume {name}", functools.partial(self._resume_own, lane)
                    )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self._retrying("start", self._setup)
            else:
                logger.error("reading %s refused: %s; retrying in 1s", name, exc)
                await asyncio.sleep(1.0)
        finally:
            for lane in lanes:
                lane.reading = False
        return got

    async def _read_levels_once(self, lanes: list[_Lane], order: WeightedOrder) -> int:
        """One weighted read of every level without blocking (one round trip, plus one per
        level that had more when others had less); a blocking one when all were empty."""
        group, me = self.cfg.group, self.cfg.consumer
        streams = [self.cfg.keys.stream(lane.name) for lane in lanes]
        quotas = order.take(min(lanes[0].slots.room, self.cfg.read_count))
        pipe = self.redis.pipeline(transaction=False)
        asked = [i for i, q in enumerate(quotas) if q > 0]
        for i in asked:
            pipe.xreadgroup(group, me, {streams[i]: ">"}, count=quotas[i])
        replies: list[Any] = await pipe.execute()
        got, drained = 0, set()
        for i, reply in zip(asked, replies, strict=True):
            entries = reply[0][1] if reply else []
            self._run_read(lanes[i], entries)
            got += len(entries)
            if len(entries) < quotas[i]:
                drained.add(i)
        if drained:  # what they left goes to the highest levels that may have more
            for i in range(len(lanes)):
                left = lanes[0].slots.room
                if left <= 0:
                    break
                if i in drained:
                    continue
                more: Any = await self.redis.xreadgroup(group, me, {streams[i]: ">"}, count=left)
                entries = more[0][1] if more else []
                self._run_read(lanes[i], entries)
                got += len(entries)
        if got:
            return got
        idle: Any = await self.redis.xreadgroup(
            group, me, dict.fromkeys(streams, ">"), count=1, block=self.cfg.block_ms
        )
        by_stream = {s: lane for s, lane in zip(streams, lanes, strict=True)}
        for stream, entries in idle or []:
            self._run_read(by_stream[stream.decode()], entries)
            got += len(entries)
        return got

    def _start(self, lane: _Lane, d: Delivery) -> None:
        """Run `d` now, or put it in its queue's next batch."""
        if lane.route.handle_batch is None:
            lane.spawn(self._process(lane, d), d)
        else:
            self._add_to_batch(lane, d)

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
                lane.name, self.cfg.consumer, after=after, idle_ms=idle_ms
            )
            await self._take_over(lane, batch)
            if len(batch) < self.reclaimer.batch:
                return
            after = batch[-1].entry_id

    async def _take_over(self, lane: _Lane, batch: list[Pending]) -> None:
        """Claim pending entries of one consumer that this process does not hold, and run
        them. They are held from before the claim, so no other path can take them too."""
        held, now, queue = lane.held, time.perf_counter(), lane.name
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
            got = await self.reclaimer.claim(lane.name, mine[0].owner, mine)
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
        busy = any(lane.tasks or lane.ready or lane.batch for lane in self.lanes.values())
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
        # The job's creation time names the one partition its row can be in.
        keys = [(safe_job_id(d.entry_id, d.fields), created_ms(d.entry_id, d.fields) / 1000.0)
                for d in batch]  # fmt: skip
        statuses: dict[tuple[str, float], JobRow] | None = None

        async def fetch() -> None:
            nonlocal statuses
            statuses = await fetch_statuses(self.pool, keys)

        await self._retrying("check redelivered", fetch)
        if statuses is None:  # stopping before PostgreSQL answered: left for other workers
            return
        for key, d in zip(keys, batch, strict=True):
            job_id, row = key[0], statuses.get(key)
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

    def _invalid(self, route: Route, res: Result) -> None:
        """Settle an entry that cannot run (undecodable, oversized, ...) as failed."""
        if self._traced:
            res = trace_invalid(res, self._attrs[route.queue])
        else:
            trace_id = trace_id_of(trace_context(res.delivery.fields)[0])
            res = dataclasses.replace(res, trace_id=trace_id)
        job_log.warning("job invalid job=%s queue=%s error=%s", res.job_id, route.queue, res.error)
        self._settle(res)

    def _job(self, route: Route, env: Envelope, d: Delivery) -> Job:
        return Job(
            env.job_id,
            route.queue,
            env.attempt,
            d.entry_id,
            enqueued_at_ms(d.entry_id),
            d.delivery_count,
            env.traceparent,
            self.recorder.progress.reporter(env.job_id, d),
        )

    def _add_to_batch(self, lane: _Lane, d: Delivery) -> None:
        """Add `d` to its queue's next batch; run the batch when full, or when its first
        job has waited the policy's `batch_wait_s`."""
        route = lane.route
        prepared = prepare(route, d, self.cfg.max_payload_bytes)
        if isinstance(prepared, Result):  # takes no place in a batch
            self._invalid(route, prepared)
            return
        if d.entry_id in lane.running:  # cannot happen while every path takes `held` first
            logger.error("entry %s of %s is already running: not started twice",
                         d.entry_id, route.queue)  # fmt: skip
            return
        env, payload = prepared
        lane.hold(d)
        if self.cancels.requested and env.job_id in self.cancels.requested:
            self._cancel_unstarted(lane, d, env)
            return
        lane.batch.append(Item(d, env, payload, self._job(route, env, d)))
        if len(lane.batch) >= lane.batch_size:
            self._fire(lane)
        elif lane.timer is None:
            wait = route.policy.batch_wait_s
            lane.timer = asyncio.get_running_loop().call_later(wait, self._fire, lane)

    def _fire(self, lane: _Lane) -> None:
        """Run the batch filling up in `lane` now."""
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        items, lane.batch = lane.batch, []
        if len(items) == 1:  # a batch of one is a job like any other: its span too
            it = items[0]
            lane.spawn_batch(self._run_one(lane, it.delivery, it.env, it.payload, it.job), items)
            it.delivery.started_mono = time.perf_counter()  # timed from here, not its wait
        elif items:
            lane.spawn_batch(self._process_batch(lane, items), items)

    async def _process_batch(self, lane: _Lane, items: list[Item]) -> None:
        route = lane.route
        now = time.time()
        # Each job's own producer trace, unless the batch's span is sampled: then that one.
        trace_ids = [trace_id_of(it.env.traceparent) for it in items]
        for it, trace_id in zip(items, trace_ids, strict=True):
            job = it.job
            self.recorder.started(
                Start(it.delivery, job.id, job.attempt, it.env.payload, now, trace_id)
            )
            self.observer.job_started(route.queue)
        if self._traced:

            def around(results: Sequence[Result] | None) -> None:
                if results is None and (batch := trace_id_of(sampled_only=True)):
                    trace_ids[:] = [batch] * len(items)
                for i, it in enumerate(items):
                    self._log_job(it.job, None if results is None else results[i])

            results = await execute_batch_traced(route, items, self._attrs[route.queue], around)
        else:
            for it in items:
                self._log_job(it.job, None)
            results = await execute_batch(route, items)
            for it, res in zip(items, results, strict=True):
                self._log_job(it.job, res)
        for done, trace_id in zip(results, trace_ids, strict=True):
            res = dataclasses.replace(done, trace_id=trace_id)
            lane.release(res.delivery.entry_id)
            self._settle(res)

    async def _process(self, lane: _Lane, d: Delivery) -> None:
        route = lane.route
        prepared = prepare(route, d, self.cfg.max_payload_bytes)
        if isinstance(prepared, Result):
            lane.release(d.entry_id)
            self._invalid(route, prepared)
            return
        env, payload = prepared
        if self.cancels.requested and env.job_id in self.cancels.requested:
            self._cancel_unstarted(lane, d, env)
            return
        await self._run_one(lane, d, env, payload, self._job(route, env, d))

    async def _run_one(
        self, lane: _Lane, d: Delivery, env: Envelope, payload: Any, job: Job
    ) -> None:
        route = lane.route
        task = asyncio.current_task()
        if task is not None:
            self._jobs[job.id] = (d, task)
        trace_id = trace_id_of(env.traceparent)  # the producer's trace, if it sent one
        self.recorder.started(Start(d, job.id, job.attempt, env.payload, time.time(), trace_id))
        self.observer.job_started(route.queue)
        if self._traced:

            def around(res: Result | None) -> None:
                nonlocal trace_id
                if res is None:  # inside the job's span: its trace, when sampled
                    trace_id = trace_id_of(sampled_only=True) or trace_id
                self._log_job(job, res)

            res = await execute_traced(
                route, env, payload, job, d, self._attrs[route.queue], around, watched=True
            )
        else:
            self._log_job(job, None)
            res = await execute(route, env, payload, job, d, watched=True)
            self._log_job(job, res)
        if task is not None and self._jobs.get(job.id, (None,))[0] is d:
            del self._jobs[job.id]
        res = dataclasses.replace(res, trace_id=trace_id)
        lane.release(d.entry_id)
        self._settle(res)

    def _cancel_unstarted(self, lane: _Lane, d: Delivery, env: Any) -> None:
        """Settle an entry whose job was cancelled before it started: it never runs."""
        lane.release(d.entry_id)
        now, mono = time.time(), time.perf_counter()
        res = cancelled_result(
            d, env.job_id, env.attempt, env.payload, now, mono,
            error="cancelled by request before it ran", executed=False,
        )  # fmt: skip
        job_log.info("job cancelled job=%s queue=%s", env.job_id, base_queue(d.queue))
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
        queue = queue_of_part(res.delivery.queue)
        if not res.executed:  # invalid or already done: counted, with no handler run
            self.observer.job_started(queue)
        error_type = None  # the conventions' error.type: the exception, else why it never ran
        if res.exception is not None:
            error_type = type(res.exception).__qualname__
        elif res.outcome is Outcome.FAILED:
            error_type = "TooManyDeliveries" if res.reason is Reason.DELIVERIES else "InvalidEntry"
        self.observer.job_finished(queue, res.outcome.value, res.duration_ms / 1000, error_type)

    def _superseded(self, d: Delivery, count: int) -> bool:
        """Whether this process runs delivery `count` (or later) of `d`'s entry, not `d`."""
        lane = self.lanes.get(d.queue)
        other = lane.running.get(d.entry_id) if lane is not None else None
        return other is not None and other is not d and other.delivery_count >= count

    # ---- maintenance loops ------------------------------------------------------------
    async def _watch(self) -> None:
        """Every handler runs under its policy's `timeout_s`: cancel the task of a job run
        alone whose time is up (a batch has its own `asyncio.timeout`).

        One check a tenth of the shortest timeout (between 10 ms and 1 s) for all running
        jobs, instead of a timer armed and disarmed for every job: a timeout fires at most
        that much late.
        """
        shortest = min((lane.route.policy.timeout_s for lane in self.lanes.values()), default=10.0)
        period = min(max(shortest / 10, 0.01), 1.0)
        while not self._exited.is_set():
            now = time.perf_counter()
            for lane in self.lanes.values():
                limit = lane.route.policy.timeout_s
                for d in lane.running.values():
                    if d.task is not None and not d.timed_out and now - d.started_mono >= limit:
                        d.timed_out = True
                        d.task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), period)

    def _beat(self) -> bytes:
        """The heartbeat's value: when, which process, and how much it runs now (read by
        `jobstream workers`; other readers only ask whether the key exists)."""
        lanes = self.lanes.values()
        return heartbeat_value(
            at=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            queues=sorted(self.routes),
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
        base = base_queue(queue)
        # A queue's levels and partitions share its one cancellation stream: read it once a
        # round, with the queue's first lane.
        if queue == next(q for q in self.lanes if base_queue(q) == base):
            for job_id in await self.cancels.poll(base):
                self._cancel_running(job_id)

    def _cancel_running(self, job_id: str) -> None:
        """Cancel the handler running `job_id` in this process, if one is: cooperatively,
        by cancelling its task; the attempt is recorded `cancelled` and acked."""
        running = self._jobs.get(job_id)
        if running is None:
            return
        d, task = running
        if not d.cancel_requested:
            logger.info("cancelling the running job %s of %s by request", job_id, d.queue)
            d.cancel_requested = True
            task.cancel("cancelled by request")

    async def _table_partitions(self) -> None:
        if self.cfg.partitions is not None:
            plan = await maintain(self.pool, self.cfg.partitions, self.cfg.consumer)
            self.prunes += [plan] if plan is not None else []

    async def _trim(self, queue: str) -> None:
        await trim(self.redis, self.cfg.keys, queue)
        for cap, n in (await self.dead_trimmer.trim(queue)).items():
            # one dead-letter stream for all levels; a partition's own
            label = queue if level_of(queue) is None else base_queue(queue)
            self.observer.dead_letters_dropped(label, cap, n)
        await self.gauges.report(queue, self.observer)

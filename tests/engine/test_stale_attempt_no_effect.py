"""Fencing: a stale attempt has no effect, and settlement is atomic and idempotent
(DESIGN inv. 9 and 10; status moves forward only in both stores)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from typing import Any

import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams import Publisher
from jobstream.streams.job import Delivery, Job, Result
from jobstream.streams.lease import Lease
from jobstream.streams.pg_store import ExecRow, JobRow, write_batch
from jobstream.streams.recorder import Recorder, RecorderConfig
from jobstream.streams.status import Outcome, Reason
from tests import fence_handlers
from tests.handlers import Work, executions_key
from tests.helpers import entry_seconds, eventually, running


async def executions(deps: Deps) -> dict[str, int]:
    raw = await deps.redis.hgetall(executions_key(deps))
    return {k.decode(): int(v) for k, v in raw.items()}


async def rows(deps: Deps, ids: list[str]) -> dict[str, Any]:
    found = await deps.pool.fetch("SELECT * FROM jobs WHERE id = ANY($1::text[])", ids)
    return {r["id"]: r for r in found}


async def test_a_paused_replica_changes_nothing_on_waking(deps: Deps, env_for):
    """SIGSTOP a replica mid-job past its liveness and its handlers' timeouts; another
    replica takes over and completes the jobs; on SIGCONT the paused one schedules no
    retry, writes no dead letter, changes neither store and acks nothing."""
    publisher = Publisher(deps.redis, deps.keys, fence_handlers.PAYLOADS)
    once = await publisher.publish_many(fence_handlers.ONCE, [Work(sleep_s=6)] * 5)
    retry = await publisher.publish_many(fence_handlers.RETRY, [Work(sleep_s=6)] * 5)
    ids = once + retry
    paused = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fence_handlers", env=env_for(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:

        async def all_started() -> bool:
            return len(await executions(deps)) == len(ids)

        await eventually(all_started, timeout_s=30)
        paused.send_signal(signal.SIGSTOP)
        taker = make_engine(deps, None, None, handlers=fence_handlers.SPECS)
        async with running(taker):

            async def all_completed() -> bool:
                found = await rows(deps, ids)
                return len(found) == len(ids) and all(
                    r["status"] == "completed" for r in found.values()
                )

            await eventually(all_completed, timeout_s=30)
            assert await executions(deps) == {i: 2 for i in ids}
            # Past the paused replica's 2 s handler timeouts: on waking, every one fires.
            await asyncio.sleep(2.5)
            paused.send_signal(signal.SIGCONT)
            await asyncio.sleep(3)  # its timeouts fire and its recorder flushes
            paused.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(paused.communicate(), 30)
            assert paused.returncode == 0, out.decode()[-3000:]
    finally:
        if paused.returncode is None:
            paused.send_signal(signal.SIGCONT)
            paused.kill()
            await paused.wait()
    log = out.decode()
    # One line per record dropped: a job's `running` record too, when the pause came before
    # it was flushed. Every job's stale attempt is ignored, whichever records it had left.
    stale = set(re.findall(r"stale attempt ignored job=(\S+)", log))
    assert stale == set(ids), log[-3000:]
    assert await executions(deps) == {i: 2 for i in ids}  # no later attempt ran
    found = await rows(deps, ids)
    for job_id in ids:
        row = found[job_id]
        assert (row["status"], row["attempts"], row["error"]) == ("completed", 1, None)
        assert row["worker_id"] == taker.cfg.consumer
        view = await deps.redis.hgetall(deps.keys.job(job_id))
        assert view[b"status"] == b"completed"
        assert view[b"worker_id"] == taker.cfg.consumer.encode()
    execs = await deps.pool.fetch(
        "SELECT outcome, worker_id, delivery FROM job_executions WHERE job_id = ANY($1)", ids
    )
    assert {(e["outcome"], e["worker_id"], e["delivery"]) for e in execs} == {
        ("completed", taker.cfg.consumer, 2)
    }
    assert len(execs) == len(ids)
    for queue in (fence_handlers.ONCE, fence_handlers.RETRY):
        assert await deps.redis.xlen(deps.keys.dead(queue)) == 0
        assert await deps.redis.zcard(deps.keys.delayed(queue)) == 0
        assert (await deps.redis.xpending(deps.keys.stream(queue), "workers"))["pending"] == 0


def _result(entry_id: str, delivery: int, outcome: Outcome, attempt: int = 1) -> Result:
    d = Delivery("q", entry_id, {b"id": b"job-1", b"payload": b"{}"}, delivery)
    job = Job("job-1", "q", attempt, entry_id, 0, delivery)
    now = time.time()
    if outcome is Outcome.COMPLETED:
        return Result.completed(
            d, job, payload=b"{}", result_json=None, started_at=now, finished_at=now, duration_ms=3
        )
    if outcome is Outcome.RETRYING:
        return Result.retry(
            d, job, payload=b"{}", error="boom", exception=RuntimeError("boom"),
            started_at=now, finished_at=now, duration_ms=3, retry_at=now + 60,
            retry_fields={"id": "job-1", "payload": "{}", "attempt": str(attempt + 1)},
        )  # fmt: skip
    return Result.failed(
        d, "job-1", attempt, reason=Reason.EXHAUSTED, error="boom", payload=b"{}",
        started_at=now, finished_at=now, duration_ms=3,
    )  # fmt: skip


async def _recorder(deps: Deps, consumer: str) -> Recorder:
    lease = Lease(10)
    return Recorder(
        deps.redis,
        deps.pool,
        RecorderConfig(
            group=deps.settings.group,
            worker_id=consumer,
            keys=deps.keys,
            hash_ttl_s=deps.settings.hash_ttl_s,
            dead_maxlen=deps.settings.dead_maxlen,
        ),
        lease,
    )


async def _read_one(deps: Deps, consumer: str) -> str:
    stream = deps.keys.stream("q")
    await deps.redis.xgroup_create(stream, deps.settings.group, id="0", mkstream=True)
    await deps.redis.xadd(stream, {"id": "job-1", "payload": "{}"})
    reply: Any = await deps.redis.xreadgroup(deps.settings.group, consumer, {stream: ">"})
    return str(reply[0][1][0][0].decode())


async def test_settlement_sent_twice_adds_no_second_retry_or_dead_letter(deps: Deps):
    """A settlement re-sent after a lost reply finds its entry acked: nothing is added."""
    for outcome in (Outcome.FAILED, Outcome.RETRYING):
        rec = await _recorder(deps, "me")
        entry = await _read_one(deps, "me")
        res = _result(entry, 1, outcome)
        await rec._pipeline([], [res])
        await rec._pipeline([], [res])  # the same round trip again, as after a lost reply
        assert await deps.redis.xlen(deps.keys.dead("q")) == (outcome is Outcome.FAILED)
        assert await deps.redis.zcard(deps.keys.delayed("q")) == (outcome is Outcome.RETRYING)
        pending = await deps.redis.xpending(deps.keys.stream("q"), deps.settings.group)
        assert pending["pending"] == 0
        await deps.redis.delete(deps.keys.stream("q"), deps.keys.dead("q"), deps.keys.delayed("q"))


async def test_settlement_of_an_entry_taken_over_does_nothing(deps: Deps):
    entry = await _read_one(deps, "paused")
    stream = deps.keys.stream("q")
    await deps.redis.xclaim(stream, deps.settings.group, "taker", 0, [entry])
    rec = await _recorder(deps, "paused")
    await rec._pipeline([], [_result(entry, 1, Outcome.FAILED)])
    assert await deps.redis.xlen(deps.keys.dead("q")) == 0
    [held] = await deps.redis.xpending_range(stream, deps.settings.group, "-", "+", 10)
    assert held["consumer"] == b"taker"  # not acked by the stale replica
    assert rec.stale == 1


def _row(fence: str, status: str, attempt: int = 1, error: str | None = None) -> JobRow:
    return JobRow(
        "job-1", "q", status, "{}", None, error, attempt, "1-0", 1.0, 2.0,
        3.0 if status in ("completed", "failed") else None, None, fence,
    )  # fmt: skip


async def _status(deps: Deps) -> tuple[str, int, str | None]:
    row = await deps.pool.fetchrow("SELECT status, attempts, error FROM jobs WHERE id = 'job-1'")
    return row["status"], row["attempts"], row["error"]


async def test_postgresql_status_moves_forward_only(deps: Deps):
    old, new = "0" * 49 + "1", "0" * 49 + "2"
    await write_batch(deps.pool, "w", [_row(new, "running")], [])
    await write_batch(deps.pool, "w", [_row(old, "retrying", error="stale")], [])
    assert await _status(deps) == ("running", 1, None)  # an older delivery changes nothing
    await write_batch(deps.pool, "w", [_row(new, "retrying", error="late")], [])
    assert await _status(deps) == ("retrying", 1, "late")  # an outcome follows its start
    await write_batch(deps.pool, "w", [_row(new, "running")], [])
    assert await _status(deps) == ("retrying", 1, "late")  # never back to running
    newer = "0" * 48 + "10"
    await write_batch(deps.pool, "w", [_row(newer, "completed", attempt=2)], [])
    assert await _status(deps) == ("completed", 2, None)
    newest = "0" * 48 + "20"
    await write_batch(deps.pool, "w", [_row(newest, "failed", 3, "x")], [])
    assert await _status(deps) == ("completed", 2, None)  # terminal is final


async def test_an_execution_row_is_written_once_when_a_commit_is_sent_again(deps: Deps):
    execs = [ExecRow("job-1", 1, "completed", None, 5, 1.0, 2.0, "1-0", 1, 1.0)]
    row = _row("0" * 49 + "1", "completed")
    await write_batch(deps.pool, "w", [row], execs)
    await write_batch(deps.pool, "w", [row], execs)  # the reply of the first was lost
    n = await deps.pool.fetchval("SELECT count(*) FROM job_executions WHERE job_id = 'job-1'")
    assert n == 1
    # another delivery of the same attempt is another execution
    await write_batch(deps.pool, "w", [], [ExecRow("job-1", 1, "completed", None, 5, 1.0, 2.0,
                                                   "1-0", 2, 1.0)])  # fmt: skip
    n = await deps.pool.fetchval("SELECT count(*) FROM job_executions WHERE job_id = 'job-1'")
    assert n == 2


async def test_job_hash_moves_forward_only(deps: Deps):
    rec = await _recorder(deps, "me")
    key = deps.keys.job("job-1")

    async def write(fence: str, status: str, error: str | None = None) -> None:
        await rec._send_scripts(rec._hash_cmds([_row(fence, status, error=error)]))

    await write("0" * 49 + "2", "running")
    await write("0" * 49 + "1", "retrying", "stale")
    assert await deps.redis.hget(key, "status") == b"running"
    await write("0" * 49 + "2", "completed")
    await write("0" * 49 + "2", "running")
    assert await deps.redis.hget(key, "status") == b"completed"
    await write("0" * 48 + "99", "failed", "later")
    assert await deps.redis.hget(key, "status") == b"completed"
    assert await deps.redis.ttl(key) > 0


async def test_refreshing_long_jobs_never_takes_back_a_reclaimed_entry(deps: Deps):
    from jobstream.streams.reclaimer import Reclaimer

    entry = await _read_one(deps, "paused")
    stream = deps.keys.stream("q")
    await deps.redis.xclaim(stream, deps.settings.group, "taker", 0, [entry])
    paused = Reclaimer(deps.redis, deps.keys, deps.settings.group, "paused")
    await paused.refresh("q", [entry])
    [held] = await deps.redis.xpending_range(stream, deps.settings.group, "-", "+", 10)
    assert held["consumer"] == b"taker"
    taker = Reclaimer(deps.redis, deps.keys, deps.settings.group, "taker")
    await asyncio.sleep(0.05)
    await taker.refresh("q", [entry])
    [held] = await deps.redis.xpending_range(stream, deps.settings.group, "-", "+", 10)
    assert (held["consumer"], held["times_delivered"]) == (b"taker", 2)
    assert int(held["time_since_delivered"]) < 50


async def test_a_stale_delivery_cannot_take_back_a_send(deps: Deps):
    """The send claim follows the newest delivery; a job's message sent meanwhile by a
    concurrent delivery is a duplicate success, not an error."""
    from jobstream.consumers.queues.sending import _mark_sending
    from jobstream.consumers.store.mailboxes import add_mailbox
    from jobstream.schema.payloads import SendEmail
    from jobstream.streams import Job, RetryableError

    await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-a")
    msg = SendEmail(mailbox_id="mb-a", to=["b@example.net"], subject="s", text="t")

    def delivery(n: int) -> Job:
        return Job("send-1", "email-sending", 1, "1700000000000-0", 0, n)

    assert await _mark_sending(deps, msg, delivery(2), "m1@x", ["b@example.net"], False)
    with pytest.raises(RetryableError, match="newer delivery"):
        await _mark_sending(deps, msg, delivery(1), "m1@x", ["b@example.net"], False)
    assert await _mark_sending(deps, msg, delivery(3), "m1@x", ["b@example.net"], False)
    await deps.pool.execute("UPDATE outbound_messages SET status = 'sent'")
    assert not await _mark_sending(deps, msg, delivery(4), "m1@x", ["b@example.net"], False)


async def test_a_skipped_redelivery_repairs_a_hash_left_running(deps: Deps):
    """A holder killed after PostgreSQL committed `completed` but before the hash was written
    leaves the view `running`; the replica that takes the entry over acks it without
    running it, and brings the hash to what PostgreSQL says."""
    from tests import handlers

    stream = deps.keys.stream(handlers.QUEUE)
    await deps.redis.xgroup_create(stream, deps.settings.group, id="0", mkstream=True)
    entry = (await deps.redis.xadd(stream, {"id": "done-1", "payload": "{}"})).decode()
    await deps.redis.xreadgroup(deps.settings.group, "dead-holder", {stream: ">"})
    d1 = Delivery(handlers.QUEUE, entry, {}, 1).fence
    row = JobRow(
        "done-1",
        handlers.QUEUE,
        "completed",
        "{}",
        '{"ok": true}',
        None,
        1,
        entry,
        entry_seconds(entry),
        2.0,
        3.0,
        None,
        d1,
    )  # fmt: skip  (created: the entry's time, as the recorder writes it)
    await write_batch(deps.pool, "dead-holder", [row], [])
    rec = await _recorder(deps, "dead-holder")
    await rec._send_scripts(rec._hash_cmds([_row(d1, "running")]))
    await deps.redis.rename(deps.keys.job("job-1"), deps.keys.job("done-1"))
    async with running(make_engine(deps, None, None, handlers=handlers.SPECS)):

        async def repaired() -> bool:
            return await deps.redis.hget(deps.keys.job("done-1"), "status") == b"completed"

        await eventually(repaired, timeout_s=20)
    view = await deps.redis.hgetall(deps.keys.job("done-1"))
    assert view[b"result"] == b'{"ok": true}'
    assert await deps.redis.ttl(deps.keys.job("done-1")) > 0
    assert await executions(deps) == {}  # acked without running
    assert (await deps.redis.xpending(stream, deps.settings.group))["pending"] == 0

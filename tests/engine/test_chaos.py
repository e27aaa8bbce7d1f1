"""Chaos: three worker processes under every fault at once (inv. 1, 3, 4, 9, 10).

In one run, over the test queue, `analytics` and `email-sending` (against a real SMTP
sink): one replica SIGKILLed twice and restarted, one SIGSTOPped past its liveness and
then continued, and every worker's Redis connection killed again and again.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import pathlib
import pprint
import random
import signal
import sys
from typing import Any, BinaryIO

import pytest

from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.worker.deps import Deps
from jobstream.schema.payloads import SendEmail
from jobstream.streams import Publisher
from jobstream.streams.redis_client import is_cluster
from tests import handlers
from tests.helpers import event, eventually, executions

Q = handlers.QUEUE
N = 30_000  # test-queue jobs
N_EVENTS = 5_000
N_SENDS = 300
SEND_CONCURRENCY = 8  # per replica: bounds what one SIGKILL can cut mid-transaction


async def spawn(env: dict[str, str], logs: pathlib.Path) -> asyncio.subprocess.Process:
    """Start a replica; its log (warnings and errors) goes to a file of its own in `logs`,
    shown when the test fails."""
    with _new_log(logs) as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.chaos_worker", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip


def _new_log(logs: pathlib.Path) -> BinaryIO:
    return open(logs / f"replica-{len(list(logs.iterdir()))}.log", "wb")


async def report(deps: Deps, logs: pathlib.Path) -> str:
    """What a failure shows, whole: the unfinished jobs, then each replica's last lines."""
    text = pprint.pformat(await unfinished(deps), width=100)
    for name, lines in replica_logs(logs).items():
        text += f"\n--- {name}\n" + "\n".join(lines)
    return text


def replica_logs(logs: pathlib.Path, lines: int = 15) -> dict[str, list[str]]:
    """The last lines each replica logged."""
    return {
        f.name: f.read_text("utf-8", "replace").splitlines()[-lines:]
        for f in sorted(logs.iterdir())
    }


async def sigkill_at(
    deps: Deps,
    procs: list[asyncio.subprocess.Process],
    env: dict[str, str],
    logs: pathlib.Path,
    threshold: int,
    at: list[int],
) -> None:
    """Once `threshold` jobs completed, SIGKILL the first replica (no drain, no records, no
    acks) and start a new one in its place."""

    async def reached() -> bool:
        return await count(deps) >= threshold

    await eventually(reached, timeout_s=150, interval_s=0.1)
    procs[0].kill()
    await procs[0].wait()
    at.append(await count(deps))
    procs[0] = await spawn(env, logs)


async def count(deps: Deps, status: str = "completed") -> int:
    return int(await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status = $1", status))


async def publish_all(deps: Deps, sink_url: str) -> tuple[list[str], list[str], list[str]]:
    await add_mailbox(
        deps.pool, "chaos@example.com", mailbox_id="mb-chaos", smtp_url=sink_url,
        daily_limit=100_000, per_minute_limit=100_000,
    )  # fmt: skip
    pub = Publisher(deps.redis, deps.keys, {**handlers.PAYLOADS, **_real()}, record_queued=False)
    work: list[str] = []
    for _ in range(N // 2000):
        work += await pub.publish_many(Q, [handlers.Work(sleep_s=0.005) for _ in range(2000)])
    day = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    events = [event(f"chaos-{i}", "open", f"mb-{i % 7}", occurred_at=day) for i in range(N_EVENTS)]
    event_ids = await pub.publish_many("analytics", events)
    sends = [
        SendEmail(
            mailbox_id="mb-chaos", to=[f"rcpt{i}@example.net"], subject=f"chaos {i}", text="hello"
        )
        for i in range(N_SENDS)
    ]
    send_ids = await pub.publish_many("email-sending", sends)
    return work, event_ids, send_ids


def _real() -> dict[str, Any]:
    from jobstream.schema.payloads import PAYLOADS

    return {q: PAYLOADS[q] for q in ("analytics", "email-sending")}


async def worker_clients(deps: Deps, pids: list[int]) -> list[tuple[Any, str]]:
    """Redis client ids of these worker processes, with the node each is connected to
    (None: the one server). A worker names its connections after its consumer,
    `<host>-<pid>-<random>`, so other users of the server are left alone."""
    r: Any = deps.redis
    nodes = r.get_nodes() if is_cluster(r) else [None]
    marks = [f"-{pid}-" for pid in pids]
    out = []
    for node in nodes:
        raw = await (r.client_list(target_nodes=node) if node else r.client_list())
        out += [
            (node, str(c["id"])) for c in raw if any(m in str(c.get("name", "")) for m in marks)
        ]
    return out


async def kill_connections(
    deps: Deps, procs: list[asyncio.subprocess.Process], times: int, stop: asyncio.Event
) -> int:
    """CLIENT KILL every Redis connection of the workers, again and again."""
    killed = 0
    for _ in range(times):
        if stop.is_set():
            break
        for node, client in await worker_clients(deps, [p.pid for p in procs]):
            on = {"target_nodes": node} if node else {}
            reply = await deps.redis.execute_command("CLIENT", "KILL", "ID", client, **on)
            killed += int(reply)
        await asyncio.sleep(random.uniform(0.4, 1.0))
    return killed


@pytest.mark.cluster_too
@pytest.mark.timeout(420)  # its own wait allows 240 s for the last jobs after the faults
async def test_every_fault_at_once_every_job_ends_once(
    deps: Deps, env_for, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
):
    env = env_for(
        JOBSTREAM_LOG_LEVEL="WARNING",
        JOBSTREAM_POLICIES=f'{{"email-sending": {{"concurrency": {SEND_CONCURRENCY}}}}}',
    )
    total = N + N_EVENTS + N_SENDS
    rand = random.Random()
    async with smtp_sink() as sink:
        work, event_ids, send_ids = await publish_all(deps, sink.url())
        procs = [await spawn(env, tmp_path) for _ in range(3)]
        stop = asyncio.Event()
        killed = 0
        sigkills: list[int] = []
        try:
            await sigkill_at(
                deps, procs, env, tmp_path, int(total * rand.uniform(0.15, 0.3)), sigkills
            )
            procs[1].send_signal(signal.SIGSTOP)  # a pause past the liveness (1.5 s)
            await asyncio.sleep(4)
            procs[1].send_signal(signal.SIGCONT)  # it wakes stale
            killed = await kill_connections(deps, procs, 8, stop)
            await sigkill_at(
                deps, procs, env, tmp_path, int(total * rand.uniform(0.55, 0.7)), sigkills
            )

            async def all_done() -> bool:
                done = await count(deps) + await count(deps, "failed")
                # email.sent events add analytics jobs beyond those published, so the count
                # alone does not say every job is over: no row may still be unfinished either.
                return (
                    done >= total
                    and not await unfinished(deps, terminal_too=False)
                    and await nothing_pending(deps)
                )

            try:
                await eventually(all_done, timeout_s=240, interval_s=0.3)
            except AssertionError as exc:
                raise AssertionError(await report(deps, tmp_path)) from exc
        finally:
            stop.set()
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
            for p in procs:
                await p.wait()
        delivered = collections.Counter(m.parsed()["Message-ID"] for m in sink.messages)
    rows = await deps.pool.fetch("SELECT queue, status, count(*) AS n FROM jobs GROUP BY 1, 2")
    by = {(r["queue"], r["status"]): r["n"] for r in rows}
    failed = await deps.pool.fetch(
        "SELECT queue, error, count(*) AS n FROM jobs WHERE status <> 'completed' GROUP BY 1, 2"
    )
    assert not failed, await report(deps, tmp_path)
    assert await nothing_pending(deps)  # the drains left nothing behind
    assert by[(Q, "completed")] == N
    assert by[("email-sending", "completed")] == N_SENDS
    # hashes agree with PostgreSQL
    for job_id in rand.sample(work, 200) + rand.sample(send_ids, 50):
        assert await deps.redis.hget(deps.keys.job(job_id), "status") == b"completed"
    # events counted once: every published event stored once, counters equal to the rows
    stored = await deps.pool.fetchval(
        "SELECT count(*) FROM analytics_events WHERE event_id LIKE 'chaos-%'"
    )
    assert stored == N_EVENTS
    assert by[("analytics", "completed")] >= len(event_ids) + N_SENDS  # + email.sent events
    events_total = await deps.pool.fetchval("SELECT count(*) FROM analytics_events")
    counted = await deps.pool.fetchval("SELECT sum(count) FROM analytics_daily_mailbox")
    assert counted == events_total
    counts = await executions(deps)
    assert set(counts) == set(work)
    extra = sum(counts.values()) - N
    assert len(delivered) == N_SENDS  # every message reached the sink
    twice = sum(n - 1 for n in delivered.values())
    for queue in (Q, "analytics", "email-sending"):
        assert await deps.redis.xlen(deps.keys.dead(queue)) == 0
    with capsys.disabled():  # reported in the test run's output, pass or fail
        print(  # noqa: T201
            f"\nchaos: SIGKILLs at {sigkills} completed jobs, one SIGSTOP, {killed} connections"
            f" killed; {extra} test-queue executions beyond one per job; {twice} messages"
            " delivered twice"
        )
    # At-least-once: only a SIGKILL (or a pause mid-job) repeats work, at most what the
    # replica had running; a lost connection repeats nothing.
    assert killed > 0
    assert extra <= 0.02 * N + 3 * 16  # running, or finished but not yet recorded
    assert twice <= 3 * SEND_CONCURRENCY  # the two SIGKILLs and the SIGSTOP


async def unfinished(deps: Deps, *, terminal_too: bool = True) -> list[dict[str, Any]]:
    """Up to 20 jobs not completed (`terminal_too=False`: not yet over), each with how many
    rows its id has, its executions and what its hash says."""
    over = ("completed",) if terminal_too else ("completed", "failed", "cancelled")
    rows = await deps.pool.fetch(
        "SELECT id, queue, status, error, attempts, fence, stream_entry_id, created_at, worker_id,"
        " (SELECT count(*) FROM jobs o WHERE o.id = j.id) AS rows_for_id,"
        " (SELECT count(*) FROM job_executions e WHERE e.job_id = j.id) AS executions"
        " FROM jobs j WHERE status <> ALL($1::text[]) LIMIT 20",
        list(over),
    )
    out = []
    for r in rows:
        job = await deps.redis.hgetall(deps.keys.job(r["id"]))
        out.append({**dict(r), "hash": {k.decode(): v.decode() for k, v in job.items()}})
    return out


async def nothing_pending(deps: Deps) -> bool:
    """No entry pending, none delayed, and none still unread (the `email.sent` events a
    send publishes may still wait in the analytics stream when every count is reached).
    A queue is looked at after the queues that publish to it: a send that ends while its
    stream is looked at has published its event before."""
    for queue in (Q, "email-sending", "analytics"):
        stream = deps.keys.stream(queue)
        pending = await deps.redis.xpending(stream, "workers")
        if pending["pending"] or await deps.redis.zcard(deps.keys.delayed(queue)):
            return False
        groups = await deps.redis.xinfo_groups(stream)
        if any(g["name"] in (b"workers", "workers") and g.get("lag") != 0 for g in groups):
            return False
    return True

"""`jobstream worker --processes N`: one supervisor, N engine processes, restarts with
backoff, and a graceful drain of all on SIGTERM; run as an operator runs it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobstream.consumers.store.webhooks import add_endpoint
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.health import read_report
from jobstream.consumers.worker.settings import Settings
from jobstream.consumers.worker.supervisor import (
    ChildOptions,
    RestartBackoff,
    Supervisor,
    child_command,
    for_slot,
)
from jobstream.schema.payloads import WebhookDelivery
from tests.helpers import alive, event, eventually, jobstream

STATUS_SQL = "SELECT id, status FROM jobs WHERE id = ANY($1::text[])"
EXECUTIONS_SQL = """
SELECT job_id, count(*) AS n, array_agg(DISTINCT worker_id) AS workers
FROM job_executions WHERE job_id = ANY($1::text[]) GROUP BY job_id
"""


class SlowReceiver:
    """A webhook endpoint that takes `delay_s` to answer 200; counts deliveries by id."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.received: list[str] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            fields = dict(
                line.lower().split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line
            )
            await reader.readexactly(int(fields.get("content-length", "0")))
            await asyncio.sleep(self.delay_s)
            self.received.append(fields["webhook-id"])
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def slow_receiver(delay_s: float) -> AsyncIterator[SlowReceiver]:
    receiver = SlowReceiver(delay_s)
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()


async def both_up(deps: Deps) -> None:
    """Wait until both processes have joined and beat (before reading anything): jobs
    published then are shared, however long one of them took to start."""

    async def two() -> bool:
        alive = [k async for k in deps.redis.scan_iter(match=deps.keys.alive("*"))]
        return len(alive) == 2

    await eventually(two, timeout_s=60, interval_s=0.2)


async def publish_deliveries(deps: Deps, url: str, n: int, tag: str) -> list[str]:
    endpoint, _ = await add_endpoint(deps.pool, url)
    now = dt.datetime.now(dt.UTC)
    payloads = [
        WebhookDelivery(
            endpoint_id=endpoint, message_id=f"msg_{tag}_{i}", event_type="email.sent",
            timestamp=now, data={"n": i},
        )
        for i in range(n)
    ]  # fmt: skip
    return await deps.publisher.publish_many("webhook", payloads)


async def statuses(deps: Deps, ids: list[str]) -> dict[str, str]:
    return {r["id"]: r["status"] for r in await deps.pool.fetch(STATUS_SQL, ids)}


async def hash_statuses(deps: Deps, ids: list[str]) -> dict[str, str | None]:
    out = {}
    for job_id in ids:
        raw = await deps.redis.hget(deps.keys.job(job_id), "status")
        out[job_id] = None if raw is None else raw.decode()
    return out


async def executions(deps: Deps, ids: list[str]) -> dict[str, Any]:
    return {r["job_id"]: r for r in await deps.pool.fetch(EXECUTIONS_SQL, ids)}


@contextlib.asynccontextmanager
async def supervisor(env: dict[str, str], *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`jobstream worker --processes 2 ARGS`, its log on stdout; killed at the end, with its
    processes, if the test left it running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobstream.consumers.cli", "worker", "--processes", "2", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:  # its processes first: none may outlive the test
            for pid in children_of(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            await proc.wait()


async def sigterm(proc: asyncio.subprocess.Process, timeout_s: float) -> str:
    """Send SIGTERM to the supervisor, wait for it to exit; its log."""
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    return out.decode()


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.fixture
def webhook_env(env_for):
    def make(**extra: str) -> dict[str, str]:
        return dict(env_for(JOBSTREAM_WEBHOOK_ALLOW_PRIVATE="true", **extra))

    return make


def test_restart_backoff_doubles_up_to_its_cap_and_resets_after_a_stable_run():
    b = RestartBackoff(base_s=0.5, cap_s=4.0, stable_s=60.0)
    assert [b.delay_s(ran_s=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay_s(ran_s=60.0) == 0.5  # it had been up a while: a new failure, not a loop
    assert b.delay_s(ran_s=59.0) == 1.0


def test_each_process_gets_its_own_name_health_file_metrics_port_and_parsers():
    s = Settings(consumer_name="w", health_file="/tmp/h.json", parse_processes=None)
    one = for_slot(s, 1, 2)
    assert (one.consumer_name, one.health_file) == ("w-1", "/tmp/h.json.1")
    assert one.parse_processes == max(1, len(os.sched_getaffinity(0)) // 2)
    assert for_slot(Settings(), 0, 2).consumer_name is None  # `<host>-<pid>-<random>` each
    options = ChildOptions(
        queues=["analytics"], concurrency=4, burst=True, metrics_port=9464,
        log_level="DEBUG", log_format="json",
    )  # fmt: skip
    cmd = child_command(1, 2, options)
    assert cmd[cmd.index("--metrics-port") + 1] == "9465"
    assert cmd[cmd.index("--slot") + 1] == "1"
    assert cmd[cmd.index("--log-level") + 1] == "DEBUG"
    assert cmd.index("--log-level") < cmd.index("worker")


async def test_two_processes_drain_the_queue_in_burst_mode(deps: Deps, env_for):
    ids = await deps.publisher.publish_many("analytics", [event(f"sup-{i}") for i in range(300)])
    out = await jobstream(env_for(), "worker", "--processes", "2", "--queues", "analytics",
                          "--burst", limit_s=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("worker ") >= 2
    assert "2 worker processes" in out.stderr
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert len(await executions(deps, ids)) == 300
    assert await deps.pool.fetchval("SELECT count(*) FROM analytics_events") == 300


async def test_processes_share_the_work_and_sigterm_drains_them_all(
    deps: Deps, webhook_env, tmp_path
):
    health = str(tmp_path / "health.json")
    # A loaded machine must neither make a live process look dead (liveness 1.5 s in tests)
    # nor cut its drain short: either would hand its jobs to the other process.
    env = webhook_env(
        JOBSTREAM_HEALTH_FILE=health,
        JOBSTREAM_ALIVE_TTL_MS="15000",
        JOBSTREAM_SHUTDOWN_GRACE_S="30",
    )
    async with (
        slow_receiver(delay_s=3.0) as receiver,
        supervisor(env, "--queues", "webhook", "--concurrency", "3") as proc,
    ):
        await both_up(deps)
        ids = await publish_deliveries(deps, f"http://127.0.0.1:{receiver.port}/h", 6, "d")

        async def all_in_flight() -> bool:
            return list((await statuses(deps, ids)).values()).count("running") == 6

        await eventually(all_in_flight, timeout_s=40)

        said: list[str] = []

        async def healthy() -> bool:
            said.append((await jobstream(env, "health")).stdout.strip())
            return said[-1] == "ok"

        # The container's health check sees the supervisor's file (rewritten every 3 s):
        # fine once both processes have reported.
        await eventually(healthy, timeout_s=20, interval_s=0.5)
        files = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
        assert files == ["health.json", "health.json.0", "health.json.1"]
        log = await sigterm(proc, 60)
    assert proc.returncode == 0, log
    assert "every worker process drained" in log
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    assert set((await hash_statuses(deps, ids)).values()) == {"completed"}
    runs = await executions(deps, ids)
    assert {job_id: r["n"] for job_id, r in runs.items()} == {i: 1 for i in ids}
    assert len({w for r in runs.values() for w in r["workers"]}) == 2  # both processes ran some
    assert sorted(receiver.received) == sorted(f"msg_d_{i}" for i in range(6))
    assert (await deps.redis.xpending(deps.keys.stream("webhook"), "workers"))["pending"] == 0


async def test_a_killed_process_is_restarted_and_its_jobs_complete(deps: Deps, webhook_env):
    async with slow_receiver(delay_s=1.0) as receiver:
        ids = await publish_deliveries(deps, f"http://127.0.0.1:{receiver.port}/h", 8, "k")
        async with supervisor(webhook_env(), "--queues", "webhook", "--concurrency", "2") as proc:

            async def some_running() -> list[str]:
                rows = await deps.pool.fetch(
                    "SELECT worker_id FROM jobs WHERE id = ANY($1::text[]) AND status = 'running'",
                    ids,
                )
                return [r["worker_id"] for r in rows]

            victim = (await eventually(some_running, timeout_s=40))[0]
            victim_pid = int(victim.split("-")[-2])
            assert victim_pid in children_of(proc.pid)
            os.kill(victim_pid, signal.SIGKILL)

            async def replaced() -> bool:
                kids = children_of(proc.pid)
                return len(kids) == 2 and victim_pid not in kids

            await eventually(replaced, timeout_s=20)

            async def all_done() -> bool:
                return set((await statuses(deps, ids)).values()) == {"completed"}

            await eventually(all_done, timeout_s=60)
            log = await sigterm(proc, 60)
    assert proc.returncode == 0, log
    assert f"(pid {victim_pid}) exited with signal SIGKILL" in log
    assert "restarting in 0.5s" in log
    assert set((await hash_statuses(deps, ids)).values()) == {"completed"}
    runs = await executions(deps, ids)
    assert set(runs) == set(ids)
    # The killed process's jobs ran again elsewhere; no job ran more than twice.
    assert all(1 <= r["n"] <= 2 for r in runs.values())
    assert set(receiver.received) == {f"msg_k_{i}" for i in range(8)}


async def test_a_sigkilled_supervisor_leaves_no_process_behind(deps: Deps, webhook_env):
    """Its processes notice at once, finish what they run (no job runs twice) and exit."""
    # A liveness no load outlasts: only the supervisor's death may stop a process here.
    env = webhook_env(JOBSTREAM_SHUTDOWN_GRACE_S="30", JOBSTREAM_ALIVE_TTL_MS="15000")
    async with (
        slow_receiver(delay_s=2.0) as receiver,
        supervisor(env, "--queues", "webhook", "--concurrency", "2") as proc,
    ):
        await both_up(deps)
        ids = await publish_deliveries(deps, f"http://127.0.0.1:{receiver.port}/h", 4, "o")

        async def all_running() -> bool:
            return list((await statuses(deps, ids)).values()).count("running") == 4

        await eventually(all_running, timeout_s=40)
        kids = children_of(proc.pid)
        assert len(kids) == 2
        proc.kill()
        await proc.wait()

        async def all_gone() -> bool:
            return not any(alive(pid) for pid in kids)

        await eventually(all_gone, timeout_s=40)
    assert set((await statuses(deps, ids)).values()) == {"completed"}
    runs = await executions(deps, ids)
    assert {job_id: r["n"] for job_id, r in runs.items()} == {i: 1 for i in ids}
    assert sorted(receiver.received) == sorted(f"msg_o_{i}" for i in range(4))


def test_a_supervisor_says_its_processes_are_starting_before_they_report(tmp_path):
    health = tmp_path / "health.json"
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    sup = Supervisor([sleeper, sleeper], grace_s=1, health_file=str(health))

    async def first_report() -> tuple[int, str | None]:
        run = asyncio.create_task(sup.run())

        async def written() -> bool:
            return await asyncio.to_thread(health.exists)

        try:
            await eventually(written)
            _, problem = read_report(str(health), 60)
        finally:
            sup.stop()
        return await run, problem

    code, problem = asyncio.run(first_report())
    assert problem == "worker process 0 starting; worker process 1 starting"
    # Processes stopped while starting (they die of the SIGTERM: no handler yet) held
    # nothing: a clean stop.
    assert code == 0


async def test_a_process_that_cannot_drain_makes_the_supervisor_exit_non_zero(
    deps: Deps, webhook_env
):
    async with slow_receiver(delay_s=8.0) as receiver:
        ids = await publish_deliveries(deps, f"http://127.0.0.1:{receiver.port}/h", 2, "g")
        env = webhook_env(JOBSTREAM_SHUTDOWN_GRACE_S="0.5")
        async with supervisor(env, "--queues", "webhook", "--concurrency", "1") as proc:

            async def both_running() -> bool:
                return list((await statuses(deps, ids)).values()).count("running") == 2

            await eventually(both_running, timeout_s=40)
            started = time.monotonic()
            log = await sigterm(proc, 30)
    assert proc.returncode == 1, log
    assert "did not drain cleanly" in log
    assert time.monotonic() - started < 8  # the grace period, not the jobs, set the pace
    assert (await deps.redis.xpending(deps.keys.stream("webhook"), "workers"))["pending"] == 2


async def test_a_configuration_error_stops_the_supervisor_without_restarts(env_for):
    # Found before any process starts: one line, as from a single worker.
    out = await jobstream(
        env_for(JOBSTREAM_POLICIES='{"nope": {"max_attempts": 2}}'),
        "worker", "--processes", "2", "--burst",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    one_line = "jobstream: JOBSTREAM_POLICIES names queues not served: nope"
    assert out.stderr.splitlines() == [one_line]
    # Found by the processes as they start: the supervisor stops them all, restarts none.
    out = await jobstream(
        env_for(JOBSTREAM_TLS_CA_FILE="/nonexistent/ca.pem"),
        "worker", "--processes", "2", "--queues", "analytics",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "configuration error; stopping all" in out.stderr
    assert "restarting" not in out.stderr
    assert "/nonexistent/ca.pem" in out.stderr


async def test_zero_processes_is_refused_in_one_line(env_for):
    out = await jobstream(env_for(), "worker", "--processes", "0")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "--processes: must be a whole number of at least 1" in out.stderr

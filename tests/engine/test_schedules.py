"""Recurring schedules against the real Redis and PostgreSQL: the CLI, occurrences across a
daylight-saving transition, catch-up after downtime, the warmup schedule, and three worker
replicas (one killed) publishing each occurrence of an `--every 1` schedule exactly once
(DESIGN.md 4: a replica's death costs nothing; no leader)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
from collections.abc import Callable

import msgspec
import pytest

from jobstream.consumers.store import mailboxes
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.streams.keys import Keys
from jobstream.streams.scheduler import Scheduler
from jobstream.streams.schedules import (
    CatchUp,
    Schedule,
    add_schedule,
    due_occurrences,
    list_schedules,
    occurrence_id,
    occurrence_of,
)
from tests.helpers import event, eventually, jobstream, running

UTC = dt.UTC
EVENT = msgspec.json.encode(event("sched-evt")).decode()


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, s: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, s, tzinfo=UTC)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


async def published_ids(deps: Deps, queue: str = "analytics") -> list[str]:
    entries = await deps.redis.xrange(deps.keys.stream(queue))
    return [f[b"id"].decode() for _, f in entries]


# ---- the command line ------------------------------------------------------------------


async def test_schedule_commands(deps: Deps, env_for: Callable[..., dict[str, str]]):
    env = env_for()
    out = await jobstream(env, "schedule", "add", "nightly", "--queue", "analytics", "--payload",
                          EVENT, "--cron", "30 2 * * *", "--tz", "Europe/Paris",
                          "--catch-up", "all")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("schedule nightly added: next run ")
    out = await jobstream(env, "schedule", "add", "tick", "--queue", "analytics", "--payload",
                          EVENT, "--every", "30")  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = json.loads((await jobstream(env, "schedule", "list", "--json")).stdout)
    assert [(r["name"], r["runs"], r["catch_up"], r["state"]) for r in listed] == [
        ("nightly", "cron 30 2 * * * Europe/Paris", "all", "active"),
        ("tick", "every 30s", "latest", "active"),
    ]
    nxt = dt.datetime.fromisoformat(listed[0]["next_run"])
    assert nxt.astimezone(dt.timezone(dt.timedelta(hours=1))).hour in (1, 2)  # 02:30 Paris
    assert listed[1]["last_run"] is None
    assert listed[1]["last_job_id"] is None
    table = (await jobstream(env, "schedule", "list")).stdout
    assert table.splitlines()[0].split() == [
        "name", "queue", "runs", "catch_up", "state", "next_run", "last_run", "last_job_id"
    ]  # fmt: skip
    assert (await jobstream(env, "schedule", "pause", "tick")).stdout.strip() == (
        "schedule tick paused"
    )
    paused = json.loads((await jobstream(env, "schedule", "list", "--json")).stdout)[1]
    assert (paused["state"], paused["next_run"]) == ("paused", None)
    assert (await jobstream(env, "schedule", "resume", "tick")).returncode == 0
    assert (await jobstream(env, "schedule", "remove", "tick")).stdout.strip() == (
        "schedule tick removed"
    )
    gone = await jobstream(env, "schedule", "pause", "tick")
    assert (gone.returncode, gone.stderr.strip()) == (1, "jobstream: no schedule 'tick'")
    assert [s.name for s in await list_schedules(deps.pool)] == ["nightly"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--cron", "61 * * * *"], "jobstream: invalid cron expression '61 * * * *': Bad minute"),
        (["--cron", "0 0 * * *", "--tz", "Mars/Olympus"],
         "jobstream: unknown time zone 'Mars/Olympus' (an IANA name such as Europe/Paris)"),
        (["--every", "5", "--tz", "Europe/Paris"],
         "jobstream: --tz applies to --cron schedules only"),
        (["--every", "0"], "argument --every: must be a whole number of seconds, not '0'"),
        (["--every", "5", "--cron", "* * * * *"], "not allowed with argument"),
        (["--every", "5", "--catch-up", "some"], "argument --catch-up: invalid choice: 'some'"),
    ],
)  # fmt: skip
async def test_schedule_add_refuses_bad_input_in_one_line(
    deps: Deps, env_for: Callable[..., dict[str, str]], args: list[str], error: str
):
    base = ["schedule", "add", "bad", "--queue", "analytics", "--payload", EVENT]
    out = await jobstream(env_for(), *base, *args)
    assert out.returncode == 2
    assert error in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert await list_schedules(deps.pool) == []
    wrong = await jobstream(env_for(), "schedule", "add", "x", "--queue", "analytics",
                            "--payload", '{"event_id": 5}', "--every", "5")  # fmt: skip
    assert wrong.returncode == 2
    assert "analytics: invalid payload" in wrong.stderr


# ---- when occurrences fall ---------------------------------------------------------------


def test_cron_occurrences_across_daylight_saving_transitions():
    """cronsim follows Debian's cron: a time skipped when clocks go forward runs at the first
    minute after the gap, a daily time repeated when they go back runs once, and a
    minute-stepped expression runs in both copies of the repeated hour."""
    daily = Schedule(name="d", queue="q", payload="{}", cron="30 2 * * *", tz="Europe/Berlin",
                     next_run_at=at(2026, 3, 28, 0, 0))  # fmt: skip
    plan, _ = due_occurrences(daily, at(2026, 3, 30, 12, 0), grace_s=10**9)
    # 02:30 CET; 03:00 CEST (02:30 does not exist on the 29th); 02:30 CEST
    assert [occurrence_id("d", w) for w in plan] == [
        "sched:d:2026-03-28T01:30:00Z",
        "sched:d:2026-03-29T01:00:00Z",
        "sched:d:2026-03-30T00:30:00Z",
    ]
    daily = msgspec.structs.replace(daily, next_run_at=at(2026, 10, 24, 0, 0))
    plan, _ = due_occurrences(daily, at(2026, 10, 26, 12, 0), grace_s=10**9)
    assert [occurrence_id("d", w) for w in plan] == [  # 02:30 CEST once, then 02:30 CET
        "sched:d:2026-10-24T00:30:00Z",
        "sched:d:2026-10-25T00:30:00Z",
        "sched:d:2026-10-26T01:30:00Z",
    ]
    halfhour = msgspec.structs.replace(daily, cron="*/30 * * * *", next_run_at=at(2026, 10, 24, 23))
    plan, resume = due_occurrences(halfhour, at(2026, 10, 25, 2, 0), grace_s=10**9)
    assert [w.strftime("%H:%M") for w in plan] == ["23:00", "23:30", "00:00", "00:30", "01:00",
                                                    "01:30", "02:00"]  # fmt: skip
    assert resume == at(2026, 10, 25, 2, 30)
    assert occurrence_of("sched:a:b:2026-10-25T01:30:00Z") == at(2026, 10, 25, 1, 30)
    assert occurrence_of("warmup-day:x") is None


async def test_scheduler_publishes_across_a_transition_with_utc_job_ids(deps: Deps):
    clock = Clock(at(2026, 3, 29, 0, 59, 30))
    await add_schedule(
        deps.pool,
        Schedule(name="berlin", queue="analytics", payload=EVENT, cron="*/30 * * * *",
                 tz="Europe/Berlin"),
        now=clock.now,
    )  # fmt: skip
    sched = Scheduler(deps.redis, deps.pool, deps.keys, grace_s=60, clock=clock)
    for minute in range(0, 62, 2):  # 01:59:30 CET to 04:00:30 CEST, local time
        clock.now = at(2026, 3, 29, 0, 59, 30) + dt.timedelta(minutes=minute)
        await sched.tick()
    assert await published_ids(deps) == [
        "sched:berlin:2026-03-29T01:00:00Z",  # 03:00 CEST: 02:00 and 02:30 do not exist
        "sched:berlin:2026-03-29T01:30:00Z",
    ]
    (s,) = await list_schedules(deps.pool)
    assert s.last_job_id == "sched:berlin:2026-03-29T01:30:00Z"
    assert s.next_run_at == at(2026, 3, 29, 2, 0)
    hashes = await deps.redis.hgetall(deps.keys.job("sched:berlin:2026-03-29T01:00:00Z"))
    assert hashes[b"status"] == b"queued"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (CatchUp.ALL, ["10:00", "10:10", "10:20", "10:30", "10:40", "10:50", "11:00"]),
        (CatchUp.LATEST, ["10:50", "11:00"]),  # the latest missed one, then on time again
        (CatchUp.NONE, ["11:00"]),
    ],
)
async def test_catch_up_after_every_replica_was_down(
    deps: Deps, policy: CatchUp, expected: list[str]
):
    """Every replica was down from 10:00 to 10:55: the schedule's occurrences missed in the
    meantime are published as its catch-up policy says, each once, whoever ticks."""
    down_at = at(2026, 12, 3, 9, 59, 59)
    await add_schedule(
        deps.pool,
        Schedule(name="ten", queue="analytics", payload=EVENT, cron="*/10 * * * *",
                 catch_up=policy),
        now=down_at,
    )  # fmt: skip
    clock = Clock(at(2026, 12, 3, 10, 55, 0))
    replicas = [
        Scheduler(deps.redis, deps.pool, deps.keys, grace_s=60, clock=clock) for _ in range(3)
    ]
    await asyncio.gather(*(r.tick() for r in replicas))
    clock.now = at(2026, 12, 3, 11, 0, 1)
    await asyncio.gather(*(r.tick() for r in replicas))
    ids = await published_ids(deps)
    assert [i[-9:-4] for i in ids] == expected
    assert sum(r.published for r in replicas) == len(expected)


# ---- the warmup queue's daily run --------------------------------------------------------


async def test_migrate_creates_the_warmup_schedule_whose_job_starts_every_mailbox(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    out = await jobstream(env_for(), "migrate")
    assert out.returncode == 0, out.stderr
    assert "schedule warmup-daily created: the warmup queue's daily run, 00:00 UTC" in out.stdout
    again = await jobstream(env_for(), "migrate")
    assert "warmup-daily" not in again.stdout  # exists: left as the operator has it
    (s,) = await list_schedules(deps.pool)
    assert (s.name, s.queue, s.cron, s.tz, s.catch_up) == (
        "warmup-daily", "warmup", "0 0 * * *", "UTC", CatchUp.LATEST
    )  # fmt: skip
    assert s.next_run_at is not None
    assert (s.next_run_at.hour, s.next_run_at.minute) == (0, 0)
    for n in (1, 2):
        await mailboxes.add_mailbox(deps.pool, f"w{n}@example.com", mailbox_id=f"mb-{n}",
                                    warmup=True)  # fmt: skip
    # The scheduler publishes the occurrence of 2026-12-03 as it would at midnight.
    clock = Clock(at(2026, 12, 3, 0, 0, 2))
    await deps.pool.execute("UPDATE schedules SET next_run_at = $1", at(2026, 12, 3))
    await Scheduler(deps.redis, deps.pool, deps.keys, clock=clock).tick()
    assert await published_ids(deps, "warmup") == ["sched:warmup-daily:2026-12-03T00:00:00Z"]
    async with running(make_engine(deps, ["warmup"])):

        async def fanned_out() -> list[str]:
            ids = await published_ids(deps, "warmup")
            return [i for i in ids if i.startswith("warmup-day:")]

        got = await eventually(fanned_out)
    assert sorted(got) == ["warmup-day:mb-1:2026-12-03", "warmup-day:mb-2:2026-12-03"]
    result = await deps.pool.fetchval(
        "SELECT result::text FROM jobs WHERE id = 'sched:warmup-daily:2026-12-03T00:00:00Z'"
    )
    assert json.loads(result) == {"status": "published", "day": "2026-12-03", "mailboxes": 2}


# ---- three replicas, one killed ----------------------------------------------------------


async def test_three_replicas_one_killed_publish_every_occurrence_exactly_once(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    """Three worker processes run the scheduler for 20 s on an `--every 1` schedule; one is
    SIGKILLed midway. Every occurrence from the first to the last is one entry: none
    twice, none missing."""
    env = env_for(JOBSTREAM_SCHEDULE_INTERVAL_S="0.2", JOBSTREAM_LOG_LEVEL="WARNING")
    quiet = asyncio.subprocess.DEVNULL
    worker = (sys.executable, "-m", "tests.handlers")
    procs = [
        await asyncio.create_subprocess_exec(*worker, env=env, stdout=quiet, stderr=quiet)
        for _ in range(3)
    ]
    try:
        out = await jobstream(env, "schedule", "add", "tick", "--queue", "analytics",
                              "--payload", EVENT, "--every", "1")  # fmt: skip
        assert out.returncode == 0, out.stderr
        await eventually(lambda: published_ids(deps), timeout_s=30)
        await asyncio.sleep(10)
        killed_at = dt.datetime.now(UTC)
        procs[0].send_signal(signal.SIGKILL)
        await asyncio.sleep(10)
        stopped_at = dt.datetime.now(UTC)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
    assert procs[0].returncode == -signal.SIGKILL
    assert [p.returncode for p in procs[1:]] == [0, 0]
    ids = await published_ids(deps)
    times = [occurrence_of(i) for i in ids]
    assert None not in times
    assert len(ids) == len(set(ids)), "an occurrence was published twice"
    seconds = sorted(int(t.timestamp()) for t in times if t is not None)
    assert seconds == list(range(seconds[0], seconds[-1] + 1)), "an occurrence is missing"
    assert seconds[0] < killed_at.timestamp() - 5  # it ran before the kill ...
    assert seconds[-1] > killed_at.timestamp() + 5  # ... and after it
    assert seconds[-1] >= int(stopped_at.timestamp()) - 2
    assert len(seconds) >= 15
    (s,) = await list_schedules(deps.pool)
    assert s.last_job_id == ids[-1]
    assert s.next_run_at is not None
    assert s.next_run_at.timestamp() > seconds[-1]


def test_keys_of_a_schedule_share_the_queue_slot():
    keys = Keys("jobs:")
    assert keys.schedule("analytics", "tick") == "jobs:{analytics}:schedule:tick"
    assert keys.unique("analytics", "j") == "jobs:{analytics}:unique:j"
    assert keys.cancels("analytics") == "jobs:{analytics}:cancels"

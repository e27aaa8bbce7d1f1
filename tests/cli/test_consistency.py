"""One CLI, one set of habits: `--json` on every listing, `--version`, `--log-level` anywhere,
`workers`, `status --watch`, progress on long commands, job fields in JSON logs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import signal
import sys
import time
from pathlib import Path

import msgspec

from jobstream.consumers.cli.main import build_parser
from jobstream.consumers.worker.deps import Deps
from jobstream.streams import Publisher
from jobstream.streams.heartbeat import heartbeat_value, read_heartbeat
from tests import handlers
from tests.helpers import (
    all_terminal,
    engine,
    event,
    eventually,
    jobstream,
    leaf_commands,
    running,
)

JOBSTREAM = str(Path(sys.executable).parent / "jobstream")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_listing_command_offers_json_and_every_command_a_log_level():
    commands = leaf_commands(build_parser())
    listings = [c for c in commands if c.split()[-1] in ("list", "status", "workers", "job")]
    assert {"dlq list", "mailbox list", "webhook list", "status", "workers", "job"} <= set(listings)
    assert [c for c in listings if "--json" not in _options(commands[c])] == []
    assert [c for c in commands if "--log-level" not in _options(commands[c])] == []


async def test_version_and_log_level_after_the_subcommand(deps: Deps, env_for):
    env = env_for()
    version = await jobstream(env, "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("jobstream ")
    assert version.stdout.split()[1][0].isdigit()
    after = await jobstream(env, "status", "--json", "--log-level", "debug")
    assert after.returncode == 0, after.stderr
    assert isinstance(json.loads(after.stdout), list)
    nested = await jobstream(env, "dlq", "list", "--log-level", "ERROR")
    assert nested.returncode == 0, nested.stderr
    bad = await jobstream(env, "status", "--log-level", "loud")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "invalid choice" in bad.stderr


async def test_json_listings_hold_what_the_tables_show(deps: Deps, env_for):
    env = env_for()
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    ids = await pub.publish_many(handlers.QUEUE, [handlers.Work(permanent=True) for _ in range(2)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
    dead = await jobstream(env, "dlq", "list", handlers.QUEUE, "--json")
    assert dead.returncode == 0, dead.stderr
    letters = json.loads(dead.stdout)
    assert sorted(r["job_id"] for r in letters) == sorted(ids)
    assert {r["reason"] for r in letters} == {"permanent"}
    added = await jobstream(env, "mailbox", "add", "json@example.com", "--id", "mb-json")
    assert added.returncode == 0, added.stderr
    boxes = json.loads((await jobstream(env, "mailbox", "list", "--json")).stdout)
    assert [b["address"] for b in boxes if b["id"] == "mb-json"] == ["json@example.com"]
    hook = await jobstream(env, "webhook", "add", "https://hooks.example.com/in")
    assert hook.returncode == 0, hook.stderr
    hooks = json.loads((await jobstream(env, "webhook", "list", "--json")).stdout)
    assert [h["url"] for h in hooks] == ["https://hooks.example.com/in"]
    assert isinstance(hooks[0]["event_types"], list)


async def _beat(deps: Deps, consumer: str, in_flight: int, queues: list[str]) -> None:
    value = heartbeat_value(at=time.time() - 2, pid=4242, host="h1", queues=queues,
                            in_flight=in_flight)  # fmt: skip
    await deps.redis.set(deps.keys.alive(consumer), value, px=60_000)


async def test_workers_and_status_tell_live_consumers_from_stale_ones(deps: Deps, env_for):
    """A consumer left in the group by a dead replica holds entries but has no heartbeat:
    `status` no longer counts it live, and `workers` shows what it holds."""
    stream, group = deps.keys.stream("analytics"), deps.settings.group
    for i in range(5):
        await deps.publisher.publish("analytics", event(f"w-{i}"), f"w-{i}")
    await deps.redis.xgroup_create(stream, group, id="0", mkstream=True)
    await deps.redis.xreadgroup(group, "ghost", {stream: ">"}, count=3)
    await deps.redis.xreadgroup(group, "replica-1", {stream: ">"}, count=1)
    await _beat(deps, "replica-1", 1, ["analytics"])
    env = env_for()

    shown = await jobstream(env, "workers", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["consumer"]: r for r in json.loads(shown.stdout)}
    assert rows["ghost"]["live"] is False
    assert rows["ghost"]["pending"] == 3
    assert rows["ghost"]["heartbeat_age_s"] is None
    assert rows["replica-1"]["live"] is True
    assert rows["replica-1"]["pending"] == 1
    assert rows["replica-1"]["in_flight"] == 1
    assert 1.5 <= rows["replica-1"]["heartbeat_age_s"] < 30
    assert (rows["replica-1"]["pid"], rows["replica-1"]["host"]) == (4242, "h1")
    table = await jobstream(env, "workers")
    assert [line.split()[1] for line in table.stdout.splitlines()[1:]] == ["live", "stale"] or [
        line.split()[1] for line in table.stdout.splitlines()[1:]
    ] == ["stale", "live"]

    status = json.loads((await jobstream(env, "status", "--json")).stdout)
    analytics = next(r for r in status if r["queue"] == "analytics")
    assert (analytics["consumers"], analytics["stale_consumers"]) == (1, 1)


async def test_a_real_worker_reports_itself_in_its_heartbeat(deps: Deps, env_for):
    env = env_for(JOBSTREAM_CONSUMER_NAME="beating-1")
    proc = await asyncio.create_subprocess_exec(
        JOBSTREAM,
        "worker",
        "--processes",
        "1",
        "--queues",
        "analytics",
        env=env,
        stderr=asyncio.subprocess.DEVNULL,
    )  # one engine process: its own pid beats under the configured name
    try:
        await eventually(lambda: deps.redis.exists(deps.keys.alive("beating-1")), timeout_s=30)
        beat = read_heartbeat(await deps.redis.get(deps.keys.alive("beating-1")))
        assert beat is not None
        assert beat.pid == proc.pid
        assert beat.queues == ["analytics"]
        assert abs(time.time() - beat.at) < 30
        rows = json.loads((await jobstream(env, "workers", "--json")).stdout)
        assert [r["live"] for r in rows if r["consumer"] == "beating-1"] == [True]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def _watch(env: dict[str, str], sig: int) -> tuple[int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        JOBSTREAM, "status", "--json", "--watch", "0.2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = [
        (await asyncio.wait_for(proc.stdout.readline(), 60)).decode(),
        (await asyncio.wait_for(proc.stdout.readline(), 60)).decode(),
    ]
    proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert not err.strip(), err.decode()
    return proc.returncode or 0, lines + out.decode().splitlines()


async def test_status_watch_prints_again_until_interrupted(deps: Deps, env_for):
    await deps.publisher.publish("analytics", event("watch-1"), "watch-1")
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, lines = await _watch(env_for(), sig)
        assert code == 0
        docs = [json.loads(line) for line in lines if line.strip()]
        assert len(docs) >= 2
        assert all(next(r for r in d if r["queue"] == "analytics")["length"] == 1 for d in docs)
    bad = await jobstream(env_for(), "status", "--watch", "0")
    assert bad.returncode == 2
    assert "0.1 to 3600" in bad.stderr


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _at_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `jobstream ARGS` with stderr on a terminal: exit code, stdout, what the terminal got."""
    primary, secondary = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            JOBSTREAM, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=secondary
        )
        os.close(secondary)
        secondary = -1
        reading = asyncio.create_task(asyncio.to_thread(_read_all, primary))
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
        shown = await asyncio.wait_for(reading, 30)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    return proc.returncode or 0, out.decode(), shown.decode(errors="replace")


async def test_long_commands_show_progress(deps: Deps, env_for):
    env = env_for()
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    ids = await pub.publish_many(handlers.QUEUE, [handlers.Work(permanent=True) for _ in range(7)])
    async with running(engine(deps)):
        await eventually(lambda: all_terminal(deps, ids))
    code, out, shown = await _at_a_terminal(env, "dlq", "replay", handlers.QUEUE, "--all")
    assert code == 0, shown
    assert f"replaying dead letters of {handlers.QUEUE}: 7/7" in shown
    assert "replayed 7 dead letters" in out

    for i in range(3):
        box = await jobstream(env, "mailbox", "add", f"warm{i}@example.com", "--warmup")
        assert box.returncode == 0, box.stderr
    code, out, shown = await _at_a_terminal(env, "warmup", "schedule")
    assert code == 0, shown
    assert "publishing warmup jobs: 3/3" in shown
    assert "published 3 warmup jobs" in out
    # Not at a terminal (a log), a quick command adds no progress lines to stderr.
    again = await jobstream(env, "warmup", "schedule")
    assert (again.returncode, again.stderr) == (0, "")


async def test_json_logs_carry_the_jobs_fields(deps: Deps, env_for):
    await deps.publisher.publish("analytics", event("evt-fields"), "fields-1")
    proc = await asyncio.create_subprocess_exec(
        JOBSTREAM, "worker", "--burst", "--queues", "analytics", "--log-format", "json",
        "--log-level", "INFO", env=env_for(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [msgspec.json.decode(line) for line in err.decode().splitlines()]
    done = [x for x in lines if x.get("job") == "fields-1" and "outcome" in x]
    assert len(done) == 1
    assert done[0]["queue"] == "analytics"
    assert done[0]["attempt"] == 1
    assert done[0]["outcome"] == "completed"
    assert isinstance(done[0]["duration_ms"], int)
    started = [x for x in lines if x.get("job") == "fields-1" and "outcome" not in x]
    assert [(x["queue"], x["attempt"]) for x in started] == [("analytics", 1)]

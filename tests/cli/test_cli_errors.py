"""Every `jobstream` command, given bad arguments or configuration: one line, non-zero, no
traceback. Run as a user runs them: subprocesses."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable

import pytest

from jobstream.consumers.cli.main import build_parser
from jobstream.consumers.worker.deps import Deps
from tests.helpers import jobstream, leaf_commands
from tests.servers import free_port

EVENT = '{"event_id":"e-1","type":"open","mailbox_id":"mb-1","occurred_at":"2026-11-30T10:00:00Z"}'
DEEP = EVENT[:-1] + ',"properties":{"x":' + "[" * 5000 + "]" * 5000 + "}}"  # 5,000 deep
BAD_REDIS = {"REDIS_URL": "redis://127.0.0.1:99999/0"}
BAD_DATABASE = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:port/x"}

# (command path, arguments, environment overrides); "-" in the path: the top level.
CASES: list[tuple[str, list[str], dict[str, str]]] = [
    ("-", [], {}),
    ("-", ["nope"], {}),
    ("-", ["--log-level", "loud", "status"], {}),
    ("worker", ["worker", "--concurrency", "0"], {}),
    ("worker", ["worker", "--metrics-port", "99999"], {}),
    ("worker", ["worker", "--burst"], BAD_REDIS),
    ("migrate", ["migrate"], BAD_DATABASE),
    ("publish", ["publish", "analytics", DEEP], {}),
    ("publish", ["publish", "analytics", "{"], {}),
    ("publish", ["publish", "analytics", EVENT, "--delay", "nan"], {}),
    ("publish", ["publish", "analytics", EVENT, "--id", "x" * 201], {}),
    ("status", ["status"], BAD_REDIS),
    ("status", ["status", "--watch", "0"], {}),
    ("status", ["status", "--log-level", "loud"], {}),
    ("workers", ["workers"], BAD_REDIS),
    ("status", ["status"], {"DATABASE_URL": "postgresql://postgres@127.0.0.1:{closed}/x"}),
    ("job", ["job"], {}),
    ("job", ["job", "no-such-job"], {}),
    ("dlq list", ["dlq", "list", "--count", "-1"], {}),
    ("dlq list", ["dlq", "list", "nope"], {}),
    ("dlq show", ["dlq", "show", "not-an-id"], {}),
    ("dlq replay", ["dlq", "replay", "analytics"], {}),
    ("dlq replay", ["dlq", "replay", "analytics", "1-1"], {}),
    ("dlq purge", ["dlq", "purge", "analytics"], {}),
    ("dlq purge", ["dlq", "purge", "analytics", "--older-than", "soon", "--yes"], {}),
    ("health", ["health", "--consumer"], {}),
    ("prune", ["prune", "--older-than", "soon"], {}),
    ("prune", ["prune", "--dry-run"], BAD_DATABASE),
    ("schema", ["schema", "no-such-queue"], {}),
    ("schema", ["schema", "--write"], {}),
    ("health", ["health"], BAD_DATABASE),
    ("dashboard", ["dashboard", "--port", "0"], {}),
    ("dashboard", ["dashboard", "--host", "0.0.0.0"], {}),  # no token: refused
    ("dashboard", ["dashboard"], {"JOBSTREAM_DASHBOARD_TOKEN": "short"}),
    ("demo", ["demo", "--events", "-5"], {}),
    ("mailbox add", ["mailbox", "add", "x@example.com", "--smtp-url", "smtp://u:p@h:99999"], {}),
    ("mailbox add", ["mailbox", "add", "no-at-sign"], {}),
    ("mailbox add", ["mailbox", "add", "a@example.com", "--daily-limit", "-1"], {}),
    ("mailbox list", ["mailbox", "list"], BAD_DATABASE),
    ("mailbox pause", ["mailbox", "pause", "nope"], {}),
    ("mailbox resume", ["mailbox", "resume", "nope"], {}),
    ("mailbox warmup", ["mailbox", "warmup", "mb-1", "maybe"], {}),
    ("mailbox warmup", ["mailbox", "warmup", "nope", "on"], {}),
    ("webhook add", ["webhook", "add", "http://0177.0.0.1/"], {}),
    ("webhook add", ["webhook", "add", "http://example.com:99999/"], {}),
    ("webhook add", ["webhook", "add", "https://example.com", "--events", "nope"], {}),
    ("webhook list", ["webhook", "list"], BAD_REDIS),
    ("webhook disable", ["webhook", "disable", "nope"], {}),
    ("warmup schedule", ["warmup", "schedule", "--day", "2026-13-01"], {}),
    (
        "schedule add",
        ["schedule", "add", "s", "--queue", "analytics", "--payload", EVENT, "--cron", "* * *"],
        {},
    ),
    (
        "schedule add",
        ["schedule", "add", "s", "--queue", "nope", "--payload", "{}", "--every", "5"],
        {},
    ),
    ("schedule list", ["schedule", "list"], BAD_DATABASE),
    ("schedule pause", ["schedule", "pause", "nope"], {}),
    ("schedule resume", ["schedule", "resume", "nope"], {}),
    ("schedule remove", ["schedule", "remove", "nope"], {}),
]


def test_the_cases_cover_every_command():
    assert {path for path, _, _ in CASES} - {"-"} == set(leaf_commands(build_parser()))


async def test_every_command_fails_in_one_line_without_a_traceback(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    closed = str(free_port())
    cases = [
        [args, env_for(**{k: v.replace("{closed}", closed) for k, v in env.items()})]
        for _, args, env in CASES
    ]
    # One process per command, forked from one that imported the CLI once (tests.cli_fork).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.cli_fork",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env_for(),
    )  # fmt: skip
    raw, _ = await asyncio.wait_for(proc.communicate(json.dumps(cases).encode()), 120)
    assert proc.returncode == 0
    problems = []
    for (path, args, _), (code, _, err) in zip(CASES, json.loads(raw), strict=True):
        shown = " ".join(a if len(a) < 40 else a[:20] + "..." for a in args)
        if code == 0 or len(err.splitlines()) != 1 or "Traceback" in err:
            problems.append(f"{path}: jobstream {shown} -> {code} {err!r}")
        elif "unexpected" in err:  # the last-resort boundary: each case is handled on purpose
            problems.append(f"{path}: jobstream {shown} -> not handled: {err!r}")
    assert problems == []


async def test_a_console_script_error_is_one_line(env_for: Callable[..., dict[str, str]]):
    """The same contract through the installed entry point, for two of the cases."""
    deep = await jobstream(env_for(), "publish", "analytics", DEEP)
    bad_port = await jobstream(env_for(**BAD_REDIS), "status")
    for out in (deep, bad_port):
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "invalid payload" in deep.stderr
    assert "REDIS_URL" in bad_port.stderr


async def test_commands_fail_fast_in_one_line_when_a_server_is_down(deps: Deps, env_for):
    closed = free_port()
    no_pg = await jobstream(
        env_for(DATABASE_URL=f"postgresql://app:s3cret@127.0.0.1:{closed}/x"), "status", limit_s=30
    )
    assert no_pg.returncode == 2
    assert "PostgreSQL at postgresql://app:***@127.0.0.1" in no_pg.stderr
    assert "s3cret" not in no_pg.stderr + no_pg.stdout
    assert no_pg.stderr.count("\n") == 1
    no_redis = await jobstream(env_for(REDIS_URL=f"redis://127.0.0.1:{closed}/0"), "status")
    assert no_redis.returncode == 1
    assert "Traceback" not in no_redis.stderr
    assert no_redis.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"JOBSTREAM_BLOCK_MS": "-1"}, ["status"], "JOBSTREAM_BLOCK_MS"),
        ({"JOBSTREAM_LOG_LEVEL": "LOUD"}, ["status"], "JOBSTREAM_LOG_LEVEL"),
        ({"REDIS_URL": "http://x"}, ["status"], "redis://, rediss:// or unix://"),
        ({}, ["worker", "--concurrency", "0"], "at least 1"),
        ({}, ["publish", "analytics", "{}", "--delay", "nan"], "delay of nan"),
        ({}, ["dlq", "show", "garbage"], "invalid dead-letter id"),
        ({}, ["dlq", "list", "nope"], "unknown queue 'nope'"),
    ],
)
async def test_bad_input_on_the_command_line_is_one_clear_line(
    deps: Deps, env_for, env: dict[str, str], args: list[str], expected: str
):
    out = await jobstream(env_for(**env), *args, limit_s=30)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr

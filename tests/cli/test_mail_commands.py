"""`jobstream mailbox|webhook|warmup`, run as a user runs them: subprocesses."""

from __future__ import annotations

import base64
import datetime as dt
import sys

import msgspec

from jobstream.consumers.worker.deps import Deps
from tests.helpers import jobstream, run

PASSWORD = "cli-relay-Pa55"


async def test_mailbox_add_list_pause_resume_warmup(deps: Deps, env_for):
    env = env_for()
    url = f"smtp://user:{PASSWORD}@relay.example.com:2525?starttls"
    add = await jobstream(
        env, "mailbox", "add", "Sales@Example.com", "--id", "mb-s", "--name", "Sales",
        "--smtp-url", url, "--per-minute-limit", "5", "--warmup",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    assert PASSWORD not in add.stdout + add.stderr
    assert "smtp://user:***@relay.example.com:2525?starttls" in add.stdout
    row = await deps.pool.fetchrow("SELECT * FROM mailboxes WHERE id = 'mb-s'")
    assert row["address"] == "sales@example.com"
    assert row["smtp_url"] == url
    assert (row["per_minute_limit"], row["daily_limit"], row["warmup_enabled"]) == (5, 500, True)
    assert row["warmup_started_on"] == dt.datetime.now(dt.UTC).date()

    stdin = await run(
        "sh", "-c",
        f"echo 'smtps://u:{PASSWORD}@mx.example.com' | \"$0\" -m jobstream.consumers.cli "
        "mailbox add ops@example.com --id mb-o --smtp-url -", sys.executable, env=env,
    )  # fmt: skip
    assert stdin.returncode == 0, stdin.stderr
    assert await deps.pool.fetchval("SELECT smtp_url FROM mailboxes WHERE id = 'mb-o'") == (
        f"smtps://u:{PASSWORD}@mx.example.com"
    )
    listed = await jobstream(env, "mailbox", "list")
    assert listed.returncode == 0
    assert "mb-s" in listed.stdout
    assert "mb-o" in listed.stdout
    assert PASSWORD not in listed.stdout

    dup = await jobstream(env, "mailbox", "add", "sales@example.com")
    assert dup.returncode == 2
    bad = await jobstream(
        env, "mailbox", "add", "x@example.com", "--smtp-url", f"http://u:{PASSWORD}@h"
    )
    assert bad.returncode == 2
    assert PASSWORD not in bad.stderr

    assert (await jobstream(env, "mailbox", "pause", "mb-s")).returncode == 0
    assert await deps.pool.fetchval("SELECT status FROM mailboxes WHERE id = 'mb-s'") == "paused"
    assert (await jobstream(env, "mailbox", "resume", "mb-s")).returncode == 0
    assert await deps.pool.fetchval("SELECT status FROM mailboxes WHERE id = 'mb-s'") == "active"
    assert (await jobstream(env, "mailbox", "warmup", "mb-s", "off")).returncode == 0
    assert (
        await deps.pool.fetchval("SELECT warmup_enabled FROM mailboxes WHERE id = 'mb-s'") is False
    )
    missing = await jobstream(env, "mailbox", "pause", "nope")
    assert missing.returncode == 2
    assert "no mailbox nope" in missing.stderr


async def test_webhook_add_list_disable(deps: Deps, env_for):
    env = env_for()
    add = await jobstream(
        env,
        "webhook",
        "add",
        "https://hooks.example.com/in",
        "--events",
        "email.sent",
        "email.bounced",
    )
    assert add.returncode == 0, add.stderr
    lines = dict(line.split(None, 1) for line in add.stdout.splitlines()[:2])
    endpoint, secret = lines["endpoint"], lines["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    row = await deps.pool.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", endpoint)
    assert row["secret"] == secret
    assert sorted(row["event_types"]) == ["email.bounced", "email.sent"]
    listed = await jobstream(env, "webhook", "list")
    assert endpoint in listed.stdout
    assert secret not in listed.stdout
    assert (await jobstream(env, "webhook", "add", "ftp://x")).returncode == 2
    metadata = await jobstream(env, "webhook", "add", "http://169.254.169.254/latest")
    assert metadata.returncode == 2
    assert "may never target 169.254.169.254" in metadata.stderr
    v6 = await jobstream(env, "webhook", "add", "http://[fe80::1]/hook")
    assert v6.returncode == 2
    assert (await jobstream(env, "webhook", "add", "https://x", "--events", "nope")).returncode == 2
    assert (await jobstream(env, "webhook", "disable", endpoint)).returncode == 0
    assert (
        await deps.pool.fetchval("SELECT active FROM webhook_endpoints WHERE id = $1", endpoint)
        is False
    )
    assert (await jobstream(env, "webhook", "disable", endpoint)).returncode == 2


async def test_warmup_schedule_publishes_one_job_per_enabled_mailbox(deps: Deps, env_for):
    env = env_for()
    for name, flags in (("a", ["--warmup"]), ("b", ["--warmup"]), ("c", [])):
        out = await jobstream(env, "mailbox", "add", f"{name}@w.test", "--id", f"mb-{name}", *flags)
        assert out.returncode == 0, out.stderr
    await jobstream(env, "mailbox", "pause", "mb-b")
    out = await jobstream(env, "warmup", "schedule", "--day", "2026-12-01")
    assert out.returncode == 0, out.stderr
    assert "published 1 warmup jobs" in out.stdout
    entries = await deps.redis.xrange(deps.keys.stream("warmup"))
    assert [e[1][b"id"] for e in entries] == [b"warmup-day:mb-a:2026-12-01"]
    assert msgspec.json.decode(entries[0][1][b"payload"]) == {
        "mailbox_id": "mb-a",
        "day": "2026-12-01",
    }

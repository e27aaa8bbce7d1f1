"""The `warmup` queue: the ramp, the plan, the peers, idempotence, the bounce-rate pause."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

import msgspec

from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.mail.inbound import WARMUP_HEADER
from jobstream.consumers.queues.warmup import daily_target, run_warmup, warmup_job_id
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.store.webhooks import add_endpoint
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import RunWarmup, SendEmail
from jobstream.streams import Job
from tests.helpers import eventually, running

TODAY = dt.datetime.now(dt.UTC).date()


def job(job_id: str = "wu") -> Job:
    return Job(job_id, "warmup", 1, "0-1", int(time.time() * 1000))


async def mailboxes(deps: Deps, url: str = "smtp://127.0.0.1:1") -> None:
    for name in ("a", "b", "c"):
        await add_mailbox(
            deps.pool, f"{name}@warm.test", mailbox_id=f"mb-{name}", smtp_url=url, warmup=True
        )
    await add_mailbox(deps.pool, "d@warm.test", mailbox_id="mb-d", smtp_url=url)  # not warming


async def planned(deps: Deps) -> list[tuple[str, SendEmail]]:
    """The email-sending jobs waiting in the delayed set: (job id, payload)."""
    out = []
    members: Any = await deps.redis.zrange(deps.keys.delayed("email-sending"), 0, -1)
    for member in members:
        fields = msgspec.json.decode(member)
        out.append((fields["id"], msgspec.json.decode(fields["payload"], type=SendEmail)))
    return sorted(out, key=lambda x: x[0])


def test_ramp_defaults_and_limits():
    s = Settings()
    assert [daily_target(s, d) for d in (-1, 0, 1, 2, 10, 17, 18, 100)] == [
        0,
        5,
        7,
        9,
        25,
        39,
        40,
        40,
    ]
    assert daily_target(s, 100, daily_limit=30) == 30
    custom = Settings(warmup_start_per_day=2, warmup_step_per_day=3, warmup_max_per_day=10)
    assert [daily_target(custom, d) for d in range(5)] == [2, 5, 8, 10, 10]


async def test_plans_the_target_to_peers_with_the_header_and_runs_twice_safely(deps: Deps):
    await mailboxes(deps)
    result = await run_warmup.fn(RunWarmup(mailbox_id="mb-a", day=TODAY), job(), deps)
    assert result["status"] == "planned"
    assert (result["target"], result["published"], result["already_planned"]) == (5, 5, 0)
    jobs = await planned(deps)
    assert [j for j, _ in jobs] == sorted(warmup_job_id("mb-a", TODAY, n) for n in range(5))
    peers = [p.to[0] for _, p in jobs]
    assert set(peers) == {"b@warm.test", "c@warm.test"}  # spread, never itself nor mb-d
    assert all(p.mailbox_id == "mb-a" for _, p in jobs)
    assert {p.headers[WARMUP_HEADER] for _, p in jobs} == {f"mb-a:{TODAY.isoformat()}"}
    assert len({p.subject for _, p in jobs}) >= 3
    assert len({p.text for _, p in jobs}) == 5
    assert all(p.text and p.text.startswith(("Hi", "Hello", "Hey", "Good")) for _, p in jobs)
    key = deps.keys.delayed("email-sending")
    scored: Any = await deps.redis.zrange(key, 0, -1, withscores=True)
    scores = [score for _, score in scored]
    assert max(scores) - min(scores) > 30_000  # spread over the day (at least a minute)

    again = await run_warmup.fn(RunWarmup(mailbox_id="mb-a", day=TODAY), job("wu2"), deps)
    assert (again["target"], again["published"], again["already_planned"]) == (5, 0, 5)
    assert len(await planned(deps)) == 5
    row = await deps.pool.fetchrow("SELECT * FROM warmup_daily WHERE mailbox_id = 'mb-a'")
    assert (row["day"], row["target"], row["sent"]) == (TODAY, 5, 0)


async def test_the_ramp_follows_the_start_date(deps: Deps):
    await mailboxes(deps)
    await deps.pool.execute(
        "UPDATE mailboxes SET warmup_started_on = $1 WHERE id = 'mb-b'", TODAY - dt.timedelta(3)
    )
    result = await run_warmup.fn(RunWarmup(mailbox_id="mb-b"), job(), deps)
    assert result["target"] == 11
    skipped = await run_warmup.fn(RunWarmup(mailbox_id="mb-d"), job(), deps)
    assert skipped["status"] == "skipped"


async def test_a_warmup_day_is_sent_exactly_to_target(deps: Deps):
    fast = msgspec.structs.replace(deps.settings, warmup_spread_s=1.0)
    deps = dataclasses.replace(deps, settings=fast)
    async with smtp_sink() as sink:
        await mailboxes(deps, sink.url())
        for mb in ("mb-a", "mb-a"):  # the second run adds nothing
            await deps.publisher.publish("warmup", RunWarmup(mailbox_id=mb, day=TODAY))
        async with running(make_engine(deps, ["warmup", "email-sending"])):

            async def sent():
                return await deps.pool.fetchval(
                    "SELECT sent FROM warmup_daily WHERE mailbox_id = 'mb-a' AND sent >= 5"
                )

            assert await eventually(sent, timeout_s=20) == 5
        assert len(sink.messages) == 5
        for got in sink.messages:
            m = got.parsed()
            assert m[WARMUP_HEADER] == f"mb-a:{TODAY.isoformat()}"
            assert got.mail_from == "a@warm.test"
            assert got.rcpt_tos[0] in ("b@warm.test", "c@warm.test")
    rows = await deps.pool.fetch("SELECT is_warmup, status FROM outbound_messages")
    assert [tuple(r) for r in rows] == [(True, "sent")] * 5


async def test_a_high_bounce_rate_pauses_warmup(deps: Deps):
    await mailboxes(deps)
    ep, _ = await add_endpoint(deps.pool, "https://hooks.example.com/x", ["mailbox.warmup_paused"])
    for i in range(24):
        status = "bounced" if i < 3 else "sent"
        await deps.pool.execute(
            "INSERT INTO outbound_messages (message_id, mailbox_id, recipients, status, sent_at) "
            "VALUES ($1, 'mb-a', ARRAY['x@y.test'], $2, now())",
            f"m{i}@warm.test",
            status,
        )
    result = await run_warmup.fn(RunWarmup(mailbox_id="mb-a"), job(), deps)
    assert result["status"] == "paused"
    assert result["bounce_rate"] == round(3 / 24, 4)
    assert (
        await deps.pool.fetchval("SELECT warmup_enabled FROM mailboxes WHERE id = 'mb-a'") is False
    )
    assert await planned(deps) == []
    hooks: Any = await deps.redis.xrange(deps.keys.stream("webhook"))
    assert len(hooks) == 1
    payload = msgspec.json.decode(hooks[0][1][b"payload"])
    assert payload["event_type"] == "mailbox.warmup_paused"
    assert payload["endpoint_id"] == ep
    # Below the minimum sample the rate is not trusted: mb-b keeps warming up.
    await deps.pool.execute(
        "INSERT INTO outbound_messages (message_id, mailbox_id, recipients, status) "
        "VALUES ('b1@warm.test', 'mb-b', ARRAY['x@y.test'], 'bounced')"
    )
    kept = await run_warmup.fn(RunWarmup(mailbox_id="mb-b"), job(), deps)
    assert kept["status"] == "planned"
    # mb-a is paused: mb-b's peers are now only mb-c.
    assert {p.to[0] for _, p in await planned(deps)} == {"c@warm.test"}

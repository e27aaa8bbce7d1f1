"""The bounce queue: every corpus file through the handler, suppression rules, events."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from jobstream.consumers.queues.bounce import process_bounce
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.payloads import BounceRecipient, ProcessBounce
from jobstream.streams import Job, PermanentError
from tests.helpers import XFAIL, add_outbound, eventually, finished, result, running

DATA = Path(__file__).parents[1] / "data"
QUEUES = ["bounce", "analytics"]


def job(job_id: str) -> Job:
    return Job(job_id, "bounce", 1, "0-1", 0)


def raw_payload(path: Path, **kw: Any) -> ProcessBounce:
    return ProcessBounce(raw_b64=base64.b64encode(path.read_bytes()).decode(), **kw)


def recipients(address: str, status: str, diagnostic: str, action: Any = None) -> ProcessBounce:
    given = BounceRecipient(address=address, status=status, diagnostic=diagnostic, action=action)
    return ProcessBounce(recipients=[given], mailbox_id="mb-1")


async def suppressed(deps: Deps) -> set[str]:
    return {r["address"] for r in await deps.pool.fetch("SELECT address FROM suppressions")}


def _mismatch(out: dict[str, Any], want: dict[str, Any]) -> str | None:
    found = {r["address"] for r in out["recipients"]}
    if found != {a.lower() for a in want["addresses"]}:
        return f"addresses {sorted(found)}"
    if want["addresses"] and not out["is_bounce"]:
        return "not a bounce"
    kinds = {r["kind"] for r in out["recipients"]}
    if kinds - {want["kind"]}:
        return f"kinds {sorted(kinds)}"
    return None


async def test_every_corpus_file_through_the_handler(deps: Deps) -> None:
    mismatches: dict[str, str] = {}
    reported: set[tuple[str, str]] = set()
    to_suppress: set[str] = set()
    files = 0
    for base in (DATA / "bounces", DATA / "bounces_extra"):
        expected = json.loads((base / "expected.json").read_text(encoding="utf-8"))
        for name, want in sorted(expected.items()):
            out = await process_bounce.fn(raw_payload(base / "messages" / name), job(name), deps)
            files += 1
            problem = _mismatch(out, want)
            if problem:
                mismatches[f"{base.name}/{name}"] = problem
            for r in out["recipients"]:
                reported.add((name, r["address"]))
                if r["kind"] == "hard" and not r["sender_side"]:
                    to_suppress.add(r["address"])
    assert files == 125
    assert set(mismatches) == set(XFAIL), mismatches  # the parser's documented disagreements
    rows = await deps.pool.fetch("SELECT job_id, address FROM bounce_recipients")
    assert {(r["job_id"], r["address"]) for r in rows} == reported
    assert len(reported) > 100
    assert await suppressed(deps) == to_suppress


async def test_hard_bounce_suppresses_marks_and_emits(deps: Deps) -> None:
    await add_outbound(deps, "orig-1@app.example.org", "mb-out")
    await deps.pool.execute(
        "INSERT INTO webhook_endpoints (id, url, secret, event_types)"
        " VALUES ('ep-1', 'https://hooks.example.com/x', 'whsec_eA==', '{email.bounced}')"
    )
    payload = ProcessBounce(
        recipients=[
            BounceRecipient(address="Gone@Example.NET", status="5.1.1", action="failed"),
            BounceRecipient(address="fine@example.net", status="2.0.0", action="delivered"),
        ],
        message_id="<orig-1@app.example.org>",
    )
    job_id = await deps.publisher.publish("bounce", payload, "hard-1")
    async with running(make_engine(deps, QUEUES)):
        (row,) = await finished(deps, job_id)
        await eventually(lambda: deps.pool.fetchval("SELECT count(*) FROM analytics_events"))
    out = result(row)
    assert out["recipients"] == [
        {
            "address": "gone@example.net",
            "kind": "hard",
            "status": "5.1.1",
            "diagnostic": None,
            "sender_side": False,
        }
    ]
    assert (out["sender_side"], out["outbound_marked"], out["suppressed"]) == (
        False,
        True,
        ["gone@example.net"],
    )
    s = await deps.pool.fetchrow("SELECT * FROM suppressions")
    assert (s["address"], s["source_job_id"]) == ("gone@example.net", "hard-1")
    assert s["reason"].startswith("hard bounce 5.1.1")
    outbound = await deps.pool.fetchrow("SELECT status, bounced_at FROM outbound_messages")
    assert outbound["status"] == "bounced"
    event = await deps.pool.fetchrow("SELECT * FROM analytics_events")
    assert (event["type"], event["mailbox_id"], event["message_id"]) == (
        "bounce",
        "mb-out",
        "orig-1@app.example.org",
    )
    assert json.loads(event["properties"])["address"] == "gone@example.net"
    assert await deps.redis.xlen(deps.keys.stream("webhook")) == 1  # email.bounced for ep-1


async def test_three_soft_bounces_within_the_window_suppress(deps: Deps) -> None:
    payload = recipients("full@example.net", "4.2.2", "mailbox full")
    old = recipients("old@example.net", "4.2.2", "mailbox full")
    await deps.pool.execute(
        "INSERT INTO soft_bounces (address, job_id, status, bounced_at)"
        " SELECT 'old@example.net', 'old-' || i, '4.2.2', now() - interval '10 days'"
        " FROM generate_series(1, 5) AS i"
    )
    async with running(make_engine(deps, QUEUES)):
        first = [await deps.publisher.publish("bounce", payload, f"soft-{i}") for i in (1, 2)]
        first.append(await deps.publisher.publish("bounce", old, "old-now"))
        rows = await finished(deps, *first)
        assert {tuple(result(r)["suppressed"]) for r in rows} == {()}
        assert await suppressed(deps) == set()
        third = await deps.publisher.publish("bounce", payload, "soft-3")
        (row,) = await finished(deps, third)
    assert result(row)["suppressed"] == ["full@example.net"]
    assert await suppressed(deps) == {"full@example.net"}
    reason = await deps.pool.fetchval("SELECT reason FROM suppressions")
    assert reason.startswith("3 soft bounces in 7 days")
    assert result(row)["outbound_marked"] is False


async def test_policy_rejections_are_not_held_against_the_recipient(deps: Deps) -> None:
    policy = DATA / "bounces_extra" / "messages" / "postfix_policy_01.eml"
    greylist = recipients("grey@example.net", "4.7.1", "Greylisted, try again later", "delayed")
    async with running(make_engine(deps, QUEUES)):
        ids = [await deps.publisher.publish("bounce", raw_payload(policy), "policy-1")]
        ids += [await deps.publisher.publish("bounce", greylist, f"grey-{i}") for i in range(4)]
        rows = await finished(deps, *ids)
    out = result(rows[0])
    assert out["sender_side"] is True
    assert [(r["address"], r["kind"], r["status"]) for r in out["recipients"]] == [
        ("erin@example.net", "hard", "5.7.1")
    ]
    assert all(result(r)["sender_side"] for r in rows)
    assert await suppressed(deps) == set()
    recorded = await deps.pool.fetchval("SELECT count(*) FROM bounce_recipients WHERE sender_side")
    assert recorded == 5


async def test_rerunning_a_job_changes_nothing(deps: Deps) -> None:
    payload = recipients("again@example.net", "5.1.1", "550 5.1.1 user unknown")
    first = await process_bounce.fn(payload, job("rerun"), deps)
    seen = await deps.pool.fetchrow("SELECT first_seen FROM suppressions")
    second = await process_bounce.fn(payload, job("rerun"), deps)
    assert first == second
    assert await deps.pool.fetchval("SELECT first_seen FROM suppressions") == seen["first_seen"]
    assert await deps.pool.fetchval("SELECT count(*) FROM bounce_recipients") == 1
    soft = recipients("soft@example.net", "4.4.1", "timed out")
    for _ in range(3):
        await process_bounce.fn(soft, job("same-soft"), deps)
    assert await deps.pool.fetchval("SELECT count(*) FROM soft_bounces") == 1
    assert await suppressed(deps) == {"again@example.net"}  # one job counts once


async def test_not_a_bounce_and_bad_input(deps: Deps) -> None:
    ordinary = DATA / "bounces" / "messages" / "qmail_08.txt"
    out = await process_bounce.fn(raw_payload(ordinary), job("ordinary"), deps)
    assert (out["is_bounce"], out["recipients"], out["published"]) == (False, [], 0)
    with pytest.raises(PermanentError, match="base64"):
        await process_bounce.fn(ProcessBounce(raw_b64="%%%"), job("bad"), deps)

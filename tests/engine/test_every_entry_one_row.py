"""Every entry ends in exactly one `jobs` row, whatever its ID or fields (inv. 1, 11)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.runtime import make_engine
from jobstream.schema.envelope import MAX_ATTEMPT, job_id_problem
from jobstream.schema.payloads import AnalyticsEvent
from jobstream.streams import Job, Policy, Publisher, PublishError, RetryableError, Route
from jobstream.streams.dead_letters import dead_fields
from jobstream.streams.dispatch import invalid_result, prepare, retry_fields, trace_invalid
from jobstream.streams.job import Delivery, Result
from jobstream.streams.status import Outcome
from tests import handlers
from tests.helpers import eventually, running

Q = handlers.QUEUE
MAX_ID = "18446744073709551615-0"  # the largest stream ID Redis accepts
LATER_Q = "test-later"


class Later(msgspec.Struct, frozen=True, kw_only=True):
    retry_after_s: str  # float() of it: inf and nan included


@handler(LATER_Q, Later, Policy(max_attempts=3))
async def later(p: Later, job: Job, deps: Deps) -> None:
    """Asks for a retry after any time at all."""
    raise RetryableError("not now", retry_after_s=float(p.retry_after_s))


def burst_engine(deps: Deps) -> Any:
    return make_engine(deps, None, None, burst=True, handlers=(*handlers.SPECS, later))


async def run_burst(deps: Deps) -> None:
    await asyncio.wait_for(burst_engine(deps).run(), 30)


async def rows_by_entry(deps: Deps) -> dict[str, Any]:
    rows = await deps.pool.fetch("SELECT * FROM jobs WHERE queue = $1", Q)
    return {r["stream_entry_id"]: r for r in rows}


async def pending(deps: Deps) -> int:
    return int((await deps.redis.xpending(deps.keys.stream(Q), "workers"))["pending"])


async def test_entries_whose_id_is_no_time_still_get_their_row(deps: Deps):
    """Explicit IDs past any timestamp, and every `*` entry after them, are recorded."""
    stream = deps.keys.stream(Q)
    ids = [
        (await deps.redis.xadd(stream, {"payload": "{}"}, id="99999999999999999-0")).decode(),
        (await deps.redis.xadd(stream, {"payload": "{}"}, id=MAX_ID)).decode(),
    ]
    for fields in ({"payload": "{}"}, {"payload": '{"permanent": true}'}, {"payload": "{nope"}):
        ids.append((await deps.redis.xadd(stream, fields)).decode())  # type: ignore[arg-type]
    assert ids[2] == "18446744073709551615-1"  # `*` now follows the huge ID
    await run_burst(deps)
    rows = await rows_by_entry(deps)
    assert set(rows) == set(ids)
    statuses = [rows[i]["status"] for i in ids]
    assert statuses == ["completed", "completed", "completed", "failed", "failed"]
    for i in ids:  # clamped to the latest time PostgreSQL and Python both read back
        assert rows[i]["created_at"].year == 9999
    assert await pending(deps) == 0
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 2


async def test_a_row_refused_even_degraded_is_stored_in_its_minimal_form(deps: Deps):
    """An execution row PostgreSQL refuses: the job is recorded `failed`, dead-lettered."""
    await deps.pool.execute(
        "ALTER TABLE job_executions ADD CONSTRAINT refuse CHECK (job_id <> 'odd-one')"
    )
    stream = deps.keys.stream(Q)
    await deps.redis.xadd(stream, {"id": "odd-one", "payload": "{}"})
    await deps.redis.xadd(stream, {"id": "fine", "payload": "{}"})
    await run_burst(deps)
    rows = {r["id"]: r for r in await deps.pool.fetch("SELECT * FROM jobs")}
    assert rows["fine"]["status"] == "completed"
    odd = rows["odd-one"]
    assert odd["status"] == "failed"
    assert "could not be recorded" in odd["error"]
    assert "refuse" in odd["error"]
    assert await deps.redis.hget(deps.keys.job("odd-one"), "status") == b"failed"
    dead = await deps.redis.xrange(deps.keys.dead(Q))
    assert [f[b"job_id"] for _, f in dead] == [b"odd-one"]
    assert await pending(deps) == 0


async def test_a_row_beyond_storing_leaves_its_entry_unacked(
    deps: Deps, caplog: pytest.LogCaptureFixture
):
    """Even the minimal row refused: no ack without a row; the others are recorded."""
    await deps.pool.execute("ALTER TABLE jobs ADD CONSTRAINT refuse CHECK (id <> 'lost-one')")
    stream = deps.keys.stream(Q)
    lost = (await deps.redis.xadd(stream, {"id": "lost-one", "payload": "{}"})).decode()
    await deps.redis.xadd(stream, {"id": "fine", "payload": "{}"})
    eng = burst_engine(deps)
    with caplog.at_level(logging.ERROR, logger="jobstream.streams.recorder"):
        task = asyncio.create_task(eng.run())

        async def recorded() -> bool:
            return bool(await deps.pool.fetchval("SELECT count(*) FROM jobs") == 1)

        await eventually(recorded)
        await asyncio.sleep(0.3)
        eng.stop()
        await asyncio.wait_for(task, 30)
    assert await deps.pool.fetchval("SELECT status FROM jobs WHERE id = 'fine'") == "completed"
    held = await deps.redis.xpending_range(stream, "workers", "-", "+", 10)
    assert [h["message_id"].decode() for h in held] == [lost]
    assert any("lost-one" in r.getMessage() and "unacked" in r.getMessage() for r in caplog.records)


async def test_a_retry_after_no_time_is_clamped_not_stuck(deps: Deps):
    """`retry_after_s` of inf, NaN or 1e300: the retry is recorded and scheduled."""
    stream = deps.keys.stream(LATER_Q)
    for i, after in enumerate(("inf", "nan", "1e300", "0")):
        payload = f'{{"retry_after_s": "{after}"}}'
        await deps.redis.xadd(stream, {"id": f"later-{i}", "payload": payload})
    engine = burst_engine(deps)
    await asyncio.wait_for(engine.run(), 30)
    rows = {r["id"]: r for r in await deps.pool.fetch("SELECT * FROM jobs")}
    assert {k: r["status"] for k, r in rows.items()} == {f"later-{i}": "retrying" for i in range(4)}
    # inf and 1e300 are capped (at a day here: the policy's cap is less), NaN is no hint
    latest = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, minutes=1)
    for i in range(4):
        assert rows[f"later-{i}"]["next_attempt_at"] <= latest
    assert rows["later-0"]["next_attempt_at"] > latest - dt.timedelta(minutes=2)
    # Each job's next attempt waits once: in the delayed set, or (0 s, or a short backoff
    # for NaN) already promoted to the stream when the burst ended, not yet read.
    members: Any = await deps.redis.zrange(deps.keys.delayed(LATER_Q), 0, -1)
    waiting = [msgspec.json.decode(m)["id"] for m in members]
    (group,) = await deps.redis.xinfo_groups(stream)
    unread = await deps.redis.xrange(stream, min=b"(" + group["last-delivered-id"])
    waiting += [f[b"id"].decode() for _, f in unread]
    assert sorted(waiting) == [f"later-{i}" for i in range(4)]
    assert (await deps.redis.xpending(stream, "workers"))["pending"] == 0


# ---- any field map decodes to a job or a failed result ---------------------------------

DEEP = b'{"a":' * 100_000 + b"1" + b"}" * 100_000  # msgspec: RecursionError
NASTY: list[dict[bytes, bytes]] = [
    {b"payload": DEEP},
    {b"payload": b"[" * 100_000},
    {b"payload": b"{}", b"attempt": b"7" * 5000},  # int() refuses more than 4,300 digits
    {b"payload": b"{}", b"attempt": b"\xff\xfe"},
    {b"payload": b"{}", b"attempt": b"-3"},
    {b"payload": b"{}", b"attempt": b"\xd9\xa3"},  # ARABIC-INDIC DIGIT THREE
    {b"payload": b"\xff\xfe{}"},
    {b"payload": b"{}", b"id": b"\xff\xfe"},
    {b"payload": b"{}", b"id": b"\x00"},
    {b"payload": b"{}", b"id": b"line\nbreak"},
    {b"payload": b"{}", b"id": b"\x1b[31mred"},
    {b"payload": b"{}", b"id": b"\xc2\x85"},  # NEL, a C1 control
    {b"payload": b"{}", b"id": b"x" * 100_000},
    {b"\xff" * 70_000: b"\xfe" * 70_000},
    {b"": b""},
    {b"payload": b""},
    {b"payload": b'{"fail_times": ' + b"9" * 5000 + b"}"},
]
# Entries the engine runs: their oddities are in fields it may ignore.
RUNNABLE: list[dict[bytes, bytes]] = [
    {b"payload": b"{}", b"traceparent": b"00-garbage-\x00", b"tracestate": b"\xff" * 100},
    {b"payload": b"{}", b"traceparent": b"\xff" * 600, b"tracestate": b"=,=,\x00"},
    {b"payload": b"{}", b"traceparent": b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01"},
    {b"payload": b"{}", b"\xff" * 70_000: b"\xfe", b"": b""},
    {b"payload": b'{"unknown": "\xff"}'},
]


def _routes() -> list[Route]:
    async def handle(payload: Any, job: Job) -> None:
        return None

    def boom(raw: bytes) -> Any:
        raise ZeroDivisionError(f"line\nbreak \x00 {raw[:10]!r}")

    spec = handlers.work
    return [
        Route(Q, spec.decoder.decode, handle, spec.policy),
        Route("analytics", msgspec.json.Decoder(AnalyticsEvent).decode, handle, spec.policy),
        Route("odd", boom, handle, spec.policy),
    ]


ROUTES = _routes()
ATTRS = {"messaging.destination.name": "jobs:{x}"}
_known = st.sampled_from([b"payload", b"id", b"attempt", b"traceparent", b"tracestate"])
_values = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"{}", b"", b"0", b"1", b"1000001", b"\x00", DEEP[:5000], b"7" * 5000]),
    st.text(max_size=40).map(str.encode),
)
field_maps = st.dictionaries(st.one_of(_known, st.binary(max_size=16)), _values, max_size=6)


def _check(route: Route, fields: dict[bytes, bytes]) -> None:
    d = Delivery(route.queue, "1-1", fields, 3)
    out = prepare(route, d, max_payload_bytes=4096)
    if isinstance(out, Result):
        assert out.outcome is Outcome.FAILED
        assert out.reason == "invalid"
        assert out.error
        assert out.error.isprintable(), out.error
        assert out.error.startswith(("invalid entry: ", f"invalid payload for {route.queue}: "))
        assert job_id_problem(out.job_id) is None
        assert 1 <= out.attempt <= MAX_ATTEMPT
        trace_invalid(out, ATTRS)
    else:
        env, _ = out
        assert job_id_problem(env.job_id) is None
        retry_fields(d, env.job_id, env.attempt)
    late = invalid_result(d, "delivered too often")
    assert late.error == "delivered too often"
    dead_fields(d.fields, queue=d.queue, job_id=late.job_id, entry_id=d.entry_id,
                reason="deliveries", error="x", attempts=late.attempt, failed_at=1.0)  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(field_maps, st.sampled_from(ROUTES))
def test_any_field_map_decodes_to_a_job_or_a_failed_result(fields, route):
    _check(route, fields)


@pytest.mark.parametrize("fields", NASTY + RUNNABLE)
def test_the_nasty_entries_decode_too(fields: dict[bytes, bytes]):
    for route in ROUTES:
        _check(route, fields)


@pytest.mark.parametrize("path", ["read", "reclaimed", "resumed", "delivered too often"])
async def test_nasty_entries_fail_at_once_on_every_path(deps: Deps, path: str):
    """Read, reclaimed from a dead replica, resumed by name, or delivered more often than
    max_deliveries: each entry gets one row, the bad ones one dead letter; all are acked."""
    stream = deps.keys.stream(Q)
    await deps.redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    bad = [(await deps.redis.xadd(stream, f)).decode() for f in NASTY]  # type: ignore[arg-type]
    good = [(await deps.redis.xadd(stream, f)).decode() for f in RUNNABLE]  # type: ignore[arg-type]
    if path != "read":  # delivered to a replica that died holding them
        holder = "me" if path == "resumed" else "gone-replica"
        await deps.redis.xreadgroup("workers", holder, {stream: ">"}, count=100)
    if path == "delivered too often":
        deps = dataclasses.replace(
            deps, settings=msgspec.structs.replace(deps.settings, max_deliveries=1)
        )
        bad, good = bad + good, []
    eng = make_engine(deps, None, None, handlers=handlers.SPECS, consumer="me")

    async def pending_count() -> int:
        return int((await deps.redis.xpending(stream, "workers"))["pending"])

    async def settled() -> bool:
        n = await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status <> 'running'")
        return bool(n == len(bad) + len(good) and await pending_count() == 0)

    async with running(eng):
        await eventually(settled)
    rows = await deps.pool.fetch("SELECT * FROM jobs")
    by_entry: dict[str, list[Any]] = {}
    for r in rows:
        by_entry.setdefault(r["stream_entry_id"], []).append(r)
    assert sorted(by_entry) == sorted(bad + good)
    assert all(len(v) == 1 for v in by_entry.values())
    letters = await deps.redis.xrange(deps.keys.dead(Q))
    assert sorted(f[b"entry_id"].decode() for _, f in letters) == sorted(bad)
    expected = ("delivered 2 times",) if good == [] else ("invalid entry: ", "invalid payload for ")
    for entry in bad:
        row = by_entry[entry][0]
        assert row["status"] == "failed", (entry, row["error"])
        assert row["error"].startswith(expected), row["error"]
        assert "\n" not in row["error"]
    for entry in good:
        assert by_entry[entry][0]["status"] == "completed"
    assert await pending_count() == 0


async def test_publish_refuses_the_ids_a_worker_would_refuse(deps: Deps):
    pub = Publisher(deps.redis, deps.keys, handlers.PAYLOADS)
    for bad in ("line\nbreak", "nul\x00", "esc\x1b[0m", "x" * 201):
        with pytest.raises(PublishError, match=r"job id (contains a control|is 201)"):
            await pub.publish(Q, handlers.Work(), job_id=bad)
    assert await deps.redis.exists(deps.keys.stream(Q)) == 0

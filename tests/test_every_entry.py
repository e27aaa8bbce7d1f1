"""Every entry ends in exactly one `jobs` row, whatever its ID or fields (inv. 1, 11)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

from consumers.deps import Deps
from consumers.handler import handler
from consumers.runtime import make_engine
from streams import Job, Policy, RetryableError
from tests import handlers
from tests.conftest import eventually

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
    return make_engine(deps, None, None, burst=True, extra=(*handlers.SPECS, later))


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
    with caplog.at_level(logging.ERROR, logger="streams.recorder"):
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
    assert rows["later-0"]["next_attempt_at"].year == 9999
    assert rows["later-2"]["next_attempt_at"].year == 9999
    assert rows["later-1"]["next_attempt_at"].year < 9999
    assert await deps.redis.zcard(deps.keys.delayed(LATER_Q)) == 4
    assert (await deps.redis.xpending(stream, "workers"))["pending"] == 0

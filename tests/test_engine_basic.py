"""End to end through the engine: bare XADD, both stores agree, invalid entries."""

from __future__ import annotations

import msgspec

from consumers.deps import Deps
from consumers.runtime import make_engine
from tests.conftest import eventually, running
from tests.helpers import event


async def test_bare_xadd_without_id_is_processed_end_to_end(deps: Deps):
    stream = deps.keys.stream("analytics")
    payload = msgspec.json.encode(event("evt-bare", "click"))
    entry_id = (await deps.redis.xadd(stream, {"payload": payload})).decode()
    async with running(make_engine(deps, ["analytics"])):

        async def done():
            return await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", entry_id)

        row = await eventually(done)
        await eventually(
            lambda: deps.pool.fetchval("SELECT status FROM jobs WHERE id = $1", entry_id)
        )
    row = await deps.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", entry_id)
    assert row["status"] == "completed"
    assert msgspec.json.decode(row["result"]) == {"recorded": True}
    assert row["attempts"] == 1
    assert row["stream_entry_id"] == entry_id
    pending = await deps.redis.xpending(stream, "workers")
    assert pending["pending"] == 0

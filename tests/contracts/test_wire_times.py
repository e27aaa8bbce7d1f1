"""Times on the wire have one format each: ISO-8601 UTC with milliseconds for timestamps,
whoever writes them, and the milliseconds of a stream entry ID (schema/times.py)."""

from __future__ import annotations

import pathlib
import re

import pytest

from jobstream.consumers import Deps
from jobstream.schema.envelope import MAX_TIME_MS, enqueued_at_ms
from jobstream.schema.text import as_text, clean_text
from jobstream.schema.times import entry_ms, entry_parts, utc_iso
from jobstream.streams import Client, list_dead, replay_dead
from jobstream.streams.cancel import Cancelled, cancel_job
from jobstream.streams.job import fence_of
from jobstream.streams.lookup import find_waiting
from tests import handlers
from tests.helpers import engine, finished, running, work_publisher

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_one_timestamp_format_with_milliseconds():
    assert utc_iso(0) == "1970-01-01T00:00:00.000Z"
    assert utc_iso(1_764_770_814.5) == "2025-12-03T14:06:54.500Z"
    assert utc_iso(1_764_770_814) == "2025-12-03T14:06:54.000Z"


def test_stream_entry_ids_read_alike_everywhere():
    assert entry_parts("1764770814123-7") == (1764770814123, 7)
    assert entry_parts("5") == (5, 0)
    assert entry_ms("1764770814123-7") == 1764770814123
    for bad in ("", "abc-1", "1-x", "-1", "1.5-0", "١٢-0"):
        with pytest.raises(ValueError, match="not a stream entry ID"):
            entry_parts(bad)
    assert enqueued_at_ms("1764770814123-0") == 1764770814123
    assert enqueued_at_ms("18446744073709551615-0") == MAX_TIME_MS
    assert enqueued_at_ms("nope") == 0
    assert fence_of("9-10", 1) < fence_of("10-1", 1) < fence_of("10-1", 2) < fence_of("10-2", 1)
    assert fence_of("nope", 3) == "0" * 50


def test_text_helpers():
    assert as_text(b"caf\xc3\xa9 \xff") == "café \ufffd"
    assert as_text("x") == "x"
    assert as_text(12) == "12"
    with pytest.raises(UnicodeDecodeError):
        as_text(b"\xff", errors="strict")
    assert clean_text("a\x00b\ud800") == "a\ufffdb\ufffd"
    assert clean_text(None) is None


async def _hash(deps: Deps, job_id: str) -> dict[str, str]:
    raw = await deps.redis.hgetall(deps.keys.job(job_id))
    return {as_text(k): as_text(v) for k, v in raw.items()}


async def test_every_writer_of_a_timestamp_writes_the_one_format(deps: Deps):
    pub = work_publisher(deps)
    queued = await pub.publish(handlers.QUEUE, handlers.Work())
    assert STAMP.fullmatch((await _hash(deps, queued))["updated_at"])  # the publisher
    later = await pub.publish(handlers.QUEUE, handlers.Work(), delay_s=3600)
    (waiting,), _ = await find_waiting(deps.redis, deps.keys, [handlers.QUEUE], later)
    assert waiting.due_at is not None
    assert STAMP.fullmatch(waiting.due_at)  # the delayed-set lookup

    dead = await pub.publish(handlers.QUEUE, handlers.Work(permanent=True))
    async with running(engine(deps)):
        await finished(deps, queued, dead)
    done = await _hash(deps, queued)  # the recorder
    for field in ("updated_at", "started_at", "completed_at"):
        assert STAMP.fullmatch(done[field]), (field, done[field])
    client = Client(deps.redis, handlers.PAYLOADS, deps.keys, pool=deps.pool)
    await deps.redis.delete(deps.keys.job(queued))
    state = await client.get(queued)  # PostgreSQL's view
    assert state is not None
    assert state.updated_at is not None
    assert STAMP.fullmatch(state.updated_at)

    (letter,) = await list_dead(deps.redis, deps.keys, handlers.QUEUE)
    assert STAMP.fullmatch(letter.fields["failed_at"])  # the dead letter
    assert await replay_dead(deps.redis, deps.pool, deps.keys, letter) is not None
    replayed = await _hash(deps, dead)  # the replay
    assert replayed["status"] == "queued"
    assert STAMP.fullmatch(replayed["updated_at"])


async def test_unique_publishes_and_cancellations_write_the_one_format(deps: Deps):
    pub = work_publisher(deps)
    unique = await pub.publish_unique(handlers.QUEUE, handlers.Work(), "once", 60)
    assert unique.published
    assert STAMP.fullmatch((await _hash(deps, "once"))["updated_at"])  # its `queued` mark
    later = await pub.publish(handlers.QUEUE, handlers.Work(), "later", delay_s=60)
    answer = await cancel_job(
        deps.redis, deps.pool, deps.keys, later, hash_ttl_s=deps.settings.hash_ttl_s
    )
    assert answer.outcome is Cancelled.CANCELLED
    cancelled = await _hash(deps, later)
    assert cancelled["status"] == "cancelled"
    for field in ("updated_at", "completed_at"):
        assert STAMP.fullmatch(cancelled[field]), (field, cancelled[field])


def test_no_code_formats_a_timestamp_of_its_own():
    """Every ISO timestamp comes from `utc_iso`: no other module formats seconds as `...SZ`
    (but schedules.py, whose run ids name their second: an identifier, read back)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    own = [
        str(path.relative_to(root))
        for folder in ("streams", "consumers", "schema", "otel")
        for path in (root / folder).rglob("*.py")
        if path.name not in ("times.py", "schedules.py")
        and re.search(r"%S\.?\w*Z", path.read_text("utf-8"))
    ]
    assert own == []

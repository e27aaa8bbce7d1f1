"""Dead letters are kept until removed or too old; byte and entry caps drop the oldest,
counted and logged; an oversized entry leaves a bounded letter that replay refuses
(DESIGN.md inv. 8, memory is bounded; and Retries and dead letters)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.otel.metrics import OtelObserver
from jobstream.streams import PublishError, read_dead, replay_dead
from jobstream.streams.dead_letters import MAX_FIELD_BYTES
from tests import handlers
from tests.helpers import eventually, jobstream, running

Q = handlers.QUEUE
DAY_MS = 86_400_000


def _engine(deps: Deps, observer: Any = None, **settings: Any) -> Any:
    s = msgspec.structs.replace(deps.settings, trim_interval_s=0.1, **settings)
    return make_engine(
        dataclasses.replace(deps, settings=s),
        None,
        None,
        handlers=handlers.SPECS,
        observer=observer,
    )


def _observer() -> tuple[OtelObserver, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return OtelObserver(MeterProvider(metric_readers=[reader]).get_meter("t")), reader


def _dropped(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """The caps that dropped letters (every cap's series exists from the start, at 0)."""
    data = reader.get_metrics_data()
    out: dict[tuple[str, str], int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "jobstream.dead_letters.dropped":
                    for p in metric.data.data_points:
                        attrs = p.attributes or {}
                        out[(str(attrs["queue"]), str(attrs["cap"]))] = int(p.value)
    assert {cap for _, cap in out} <= {"age", "entries", "bytes"}
    return {key: n for key, n in out.items() if n}


async def _letter(deps: Deps, entry_id: str = "*", size: int = 100) -> str:
    fields = {"payload": "x" * size, "reason": "permanent", "job_id": "j", "queue": Q}
    return (await deps.redis.xadd(deps.keys.dead(Q), fields, id=entry_id)).decode()  # type: ignore[arg-type]


async def test_letters_are_kept_for_the_max_age_then_expire(
    deps: Deps, caplog: pytest.LogCaptureFixture
):
    now = int(time.time() * 1000)
    old = await _letter(deps, f"{now - 31 * DAY_MS}-0")
    kept = [await _letter(deps, f"{now - 29 * DAY_MS}-0"), await _letter(deps)]
    observer, reader = _observer()
    with caplog.at_level(logging.INFO, logger="jobstream.streams.trimmer"):
        async with running(_engine(deps, observer)):  # the default age: 30 days

            async def expired() -> bool:
                return bool(await deps.redis.xlen(deps.keys.dead(Q)) == 2)

            await eventually(expired)
    left = [e[0].decode() for e in await deps.redis.xrange(deps.keys.dead(Q))]
    assert left == kept
    assert old not in left
    assert _dropped(reader) == {(Q, "age"): 1}
    assert any("expired 1 dead letters" in r.getMessage() for r in caplog.records)


async def test_the_byte_cap_drops_the_oldest_letters_counted_and_logged(
    deps: Deps, caplog: pytest.LogCaptureFixture
):
    ids = [await _letter(deps, size=10_000) for _ in range(100)]  # about 1 MB
    cap = 200_000
    observer, reader = _observer()
    with caplog.at_level(logging.WARNING, logger="jobstream.streams.trimmer"):
        async with running(_engine(deps, observer, dead_letter_max_bytes=cap)):

            async def capped() -> bool:
                used = await deps.redis.memory_usage(deps.keys.dead(Q), samples=0)
                return bool(used is not None and used <= cap)

            await eventually(capped)
    left = [e[0].decode() for e in await deps.redis.xrange(deps.keys.dead(Q))]
    assert 0 < len(left) < 100
    assert left == ids[-len(left) :]  # the newest are kept
    assert _dropped(reader) == {(Q, "bytes"): 100 - len(left)}
    logged = [
        r.getMessage()
        for r in caplog.records
        if "JOBSTREAM_DEAD_LETTER_MAX_BYTES" in r.getMessage()
    ]
    assert logged
    assert f"dropped the {100 - len(left)} oldest dead letters of {Q}" in logged[0]


async def test_the_entry_cap_is_counted_too(deps: Deps):
    for _ in range(30):
        await _letter(deps)
    observer, reader = _observer()
    async with running(_engine(deps, observer, dead_maxlen=10)):

        async def capped() -> bool:
            return bool(await deps.redis.xlen(deps.keys.dead(Q)) == 10)

        await eventually(capped)
    assert _dropped(reader) == {(Q, "entries"): 20}


async def test_an_oversized_entry_leaves_a_bounded_letter_that_replay_refuses(
    deps: Deps, env_for: Any
):
    payload = b'{"result_text": "' + b"a" * 1_000_000 + b'"}'
    note = b"n" * 100_000
    stream = deps.keys.stream(Q)
    big = (await deps.redis.xadd(stream, {"id": "big", "payload": payload})).decode()
    await deps.redis.xadd(stream, {"id": "noted", "payload": b"{nope", "note": note})
    async with running(_engine(deps, max_payload_bytes=500_000)):

        async def dead() -> bool:
            return bool(await deps.redis.xlen(deps.keys.dead(Q)) == 2)

        await eventually(dead)
    raw: Any = await deps.redis.xrange(deps.keys.dead(Q))
    letters: dict[bytes, tuple[str, dict[bytes, bytes]]] = {
        f[b"job_id"]: (i.decode(), f) for i, f in raw
    }
    dead_id, letter = letters[b"big"]
    assert letter[b"entry_id"].decode() == big
    assert letter[b"payload"] == payload[:MAX_FIELD_BYTES]
    assert letter[b"payload_size"] == str(len(payload)).encode()
    assert letter[b"payload_sha256"] == hashlib.sha256(payload).hexdigest().encode()
    assert b"at most 500000" in letter[b"error"]
    noted_id, noted = letters[b"noted"]
    assert noted[b"note"] == note[:MAX_FIELD_BYTES]
    assert noted[b"truncated"] == b"note"
    assert b"payload_size" not in noted
    row = await deps.pool.fetchrow("SELECT status FROM jobs WHERE id = 'big'")
    assert row["status"] == "failed"

    found = await read_dead(deps.redis, deps.keys, Q, dead_id)
    assert found is not None
    with pytest.raises(PublishError, match=f"payload was {len(payload)} bytes"):
        await replay_dead(deps.redis, deps.pool, deps.keys, found)
    env = env_for()
    one = await jobstream(env, "dlq", "replay", Q, dead_id)
    assert one.returncode != 0
    assert one.stderr.count("\n") == 1, one.stderr
    assert "no longer hold the whole entry" in one.stderr
    every = await jobstream(env, "dlq", "replay", Q, "--all")
    assert every.returncode != 0
    assert "2 dead letters" in every.stderr
    assert every.stderr.count("\n") == 1, every.stderr
    assert await deps.redis.xlen(deps.keys.dead(Q)) == 2  # both kept
    assert await deps.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'") == 0
    assert await deps.redis.hget(deps.keys.job("big"), "status") == b"failed"
    assert (await read_dead(deps.redis, deps.keys, Q, noted_id)) is not None

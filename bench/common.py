"""Shared pieces of the benchmarks: a scratch database and key prefix, a no-op queue."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.schema.migrate import apply_migrations
from jobstream.streams import Job, Policy

ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NOOP_QUEUE = "bench-noop"


class Noop(msgspec.Struct, frozen=True):
    """Payload of the benchmark's no-op queue."""

    n: int
    text: str = "hello"


@handler(NOOP_QUEUE, Noop, Policy(concurrency=64, timeout_s=30))
async def noop(payload: Noop, job: Job, deps: Deps) -> None:
    """Do nothing: what remains is the engine's own cost."""
    return None


NOOP: HandlerSpec[Any] = noop


def db_url(name: str) -> str:
    return f"{ADMIN_URL.rpartition('/')[0]}/{name}"


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A freshly migrated database, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(db_url(name))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield db_url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def drop_keys(prefix: str) -> None:
    """Delete every Redis key a benchmark made under `prefix`."""
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=5000)]
    for i in range(0, len(keys), 1000):
        await redis.delete(*keys[i : i + 1000])
    await redis.aclose()

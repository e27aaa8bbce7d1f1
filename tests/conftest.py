"""Fixtures: a fresh key prefix and a fresh database (cloned from a migrated template) per test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.migrate import apply_migrations, load_migrations
from tests.helpers import ADMIN_URL, REDIS_URL
from tests.servers import OwnPostgres, OwnRedis


def _db_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def _template_name() -> str:
    digest = hashlib.sha1("".join(m.sql for m in load_migrations()).encode()).hexdigest()[:10]
    return f"jobstream_tpl_{digest}"


async def _ensure_template() -> str:
    name = _template_name()
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute("SELECT pg_advisory_lock(4242)")
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}_tmp"')
            conn = await asyncpg.connect(_db_url(f"{name}_tmp"))
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()
            await admin.execute(f'ALTER DATABASE "{name}_tmp" RENAME TO "{name}"')
        await admin.execute("SELECT pg_advisory_unlock(4242)")
    finally:
        await admin.close()
    return name


@pytest.fixture(scope="session")
def template_db() -> str:
    return asyncio.run(_ensure_template())


@pytest.fixture
async def database(template_db: str) -> AsyncIterator[str]:
    """A database of its own for one test, dropped after."""
    name = f"jst_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _db_url(name)
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def settings(database: str, prefix: str) -> Settings:
    return Settings(
        redis_url=REDIS_URL,
        database_url=database,
        stream_prefix=f"{prefix}jobs:",
        job_prefix=f"{prefix}job:",
        block_ms=100,
        reclaim_interval_s=0.5,
        alive_ttl_ms=1500,
        shutdown_grace_s=5,
        pg_pool_size=10,
    )


@pytest.fixture
async def deps(settings: Settings, prefix: str) -> AsyncIterator[Deps]:
    async with connect(settings) as d:
        yield d
        keys = [k async for k in d.redis.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await d.redis.delete(*keys[i : i + 500])


@pytest.fixture
def env_for(settings: Settings) -> Callable[..., dict[str, str]]:
    """Environment variables that give a subprocess this test's settings."""

    def make(**extra: str) -> dict[str, str]:
        out = dict(os.environ)
        raw = msgspec.to_builtins(settings)
        for key, value in raw.items():
            if value is not None:
                out[key] = str(value)
        out.update(extra)
        return out

    return make


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    """A private, migrated PostgreSQL cluster on a free port, for tests that stop it."""
    with tempfile.TemporaryDirectory(prefix="jobstream-pg-") as folder:
        pg = OwnPostgres(pathlib.Path(folder))
        await asyncio.to_thread(pg.init)
        await asyncio.to_thread(pg.start)
        conn = await asyncpg.connect(pg.url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        try:
            yield pg
        finally:
            if await pg.answers():
                await asyncio.to_thread(pg.stop)


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    """A private redis-server on a free port, for tests that kill or stop it."""
    with tempfile.TemporaryDirectory(prefix="jobstream-redis-") as folder:
        server = OwnRedis(pathlib.Path(folder))
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

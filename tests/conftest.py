"""Fixtures: a fresh key prefix and a fresh database (cloned from a migrated template) per test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import msgspec
import pytest

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.migrate import apply_migrations, load_migrations
from jobstream.streams import PartitionPolicy, ensure_partitions
from tests.cluster_servers import OwnCluster
from tests.helpers import ADMIN_URL, REDIS_URL, quick_settings
from tests.servers import OwnPostgres, OwnRedis


def _db_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def _template_name() -> str:
    digest = hashlib.sha1("".join(m.sql for m in load_migrations()).encode()).hexdigest()[:10]
    day = time.strftime("%Y%m%d", time.gmtime())  # its job partitions start today
    return f"jobstream_tpl_{digest}_{day}"


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
                await ensure_partitions(conn, PartitionPolicy())  # as `jobstream migrate`
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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[OwnCluster]:
    """A Redis Cluster of 3 masters, each with a replica, shared by the tests that ask."""
    with tempfile.TemporaryDirectory(prefix="jobstream-cluster-") as folder:
        cluster = OwnCluster(pathlib.Path(folder))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """`single` (the shared server), or `cluster` for the second run of a test marked
    `cluster_too` (or of a module whose `pytestmark` has it)."""
    return str(getattr(request, "param", "single"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each `cluster_too` test that uses Redis on one server and on a cluster."""
    if metafunc.definition.get_closest_marker("cluster_too") is None:
        return
    if "redis_kind" in metafunc.fixturenames:
        metafunc.parametrize("redis_kind", ["single", "cluster"], indirect=True)


@pytest.fixture
def redis_target(redis_kind: str, request: pytest.FixtureRequest) -> tuple[str, bool]:
    """The Redis URL the test's settings name, and whether it is a cluster."""
    if redis_kind == "cluster":
        cluster: OwnCluster = request.getfixturevalue("redis_cluster")
        return cluster.url, True
    return REDIS_URL, False


@pytest.fixture
def settings(database: str, prefix: str, redis_target: tuple[str, bool]) -> Settings:
    return quick_settings(redis_target[0], redis_target[1], database, prefix)


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

"""The API answers as its OpenAPI description says: schemathesis generates requests for
every operation and checks each response (status, content type, schema, no server error)
against a running `jobstream dashboard`."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import hypothesis
import msgspec
import pytest
import redis
import schemathesis

from jobstream.consumers.dashboard.api import openapi
from jobstream.streams import Keys
from jobstream.streams.dead_letters import dead_fields
from tests.conftest import _db_url
from tests.helpers import ADMIN_URL, REDIS_URL
from tests.ops.dashboard_helpers import bearer, dashboard

SCHEMA = schemathesis.openapi.from_dict(openapi())
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def _database(template: str) -> str:
    name = f"jst_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(_db_url(name))
    try:  # a failed job with its execution, and a completed one
        await conn.execute(
            """
            INSERT INTO jobs (id, queue, status, payload, result, error, attempts, trace_id,
                              stream_entry_id)
            VALUES ('api-failed', 'webhook', 'failed', '{"endpoint_id": "x"}', NULL,
                    'no webhook endpoint x', 1, $1, '1-0'),
                   ('api-done', 'analytics', 'completed', '{}', '{"recorded": true}', NULL, 1,
                    NULL, '2-0')
            """,
            TRACE,
        )
        await conn.execute(
            """
            INSERT INTO job_executions (job_id, attempt, outcome, error, duration_ms, worker_id,
                                        started_at, finished_at, job_created_at)
            SELECT id, 1, status, error, 3, 'w1', now(), now(), created_at
            FROM jobs WHERE id IN ('api-failed', 'api-done')
            """
        )
    finally:
        await conn.close()
    return name


async def _drop(name: str) -> None:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _seed_redis(r: redis.Redis, keys: Keys) -> None:
    """Dead letters, a consumer holding an entry, and a job hash."""
    for i in range(3):
        fields = dead_fields(
            {b"id": f"dead-{i}".encode(), b"payload": b'{"endpoint_id": "x"}'},
            queue="webhook",
            job_id=f"dead-{i}",
            entry_id=f"{i + 1}-0",
            reason="permanent",
            error="no webhook endpoint x",
            attempts=1,
            failed_at=dt.datetime.now(dt.UTC).timestamp(),
        )
        r.xadd(keys.dead("webhook"), fields)
    stream = keys.stream("analytics")
    r.xadd(stream, {"id": "held", "payload": "{}"})
    r.xgroup_create(stream, "workers", id="0", mkstream=True)
    r.xreadgroup("workers", "api-worker", {stream: ">"}, count=1)
    r.set(keys.alive("api-worker"), str(dt.datetime.now(dt.UTC).timestamp()), px=600_000)
    r.hset(keys.job("api-failed"), mapping={"status": "failed", "queue": "webhook"})


@pytest.fixture(scope="module")
def api_base(template_db: str) -> Iterator[str]:
    """A running dashboard on a database and key prefix of this module's own."""
    name = asyncio.run(_database(template_db))
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    keys = Keys(f"{prefix}jobs:", f"{prefix}job:")
    r = redis.Redis.from_url(REDIS_URL)
    _seed_redis(r, keys)
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": _db_url(name),
        "JOBSTREAM_STREAM_PREFIX": keys.prefix,
        "JOBSTREAM_JOB_PREFIX": keys.job_prefix,
        "JOBSTREAM_TRACE_URL": "http://localhost:16686/trace/{trace_id}",
        "JOBSTREAM_LOG_LEVEL": "WARNING",
    }
    try:
        with dashboard(env) as base:
            yield base
    finally:
        found = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if found:
            r.delete(*found)
        r.close()
        asyncio.run(_drop(name))


def test_the_served_description_is_the_generated_one(api_base: str):
    served = httpx.get(f"{api_base}/api/openapi.json", timeout=10).json()
    assert served == msgspec.json.decode(msgspec.json.encode(openapi()))
    operations = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops}
    assert operations == {
        ("GET", "/api/queues"),
        ("GET", "/api/jobs"),
        ("GET", "/api/jobs/{job_id}"),
        ("GET", "/api/dead"),
        ("GET", "/api/dead/{queue}/{dead_id}"),
        ("POST", "/api/dead/{queue}/replay"),
        ("POST", "/api/dead/{queue}/purge"),
        ("GET", "/api/workers"),
    }


def test_seeded_answers_hold_what_the_pages_show(api_base: str):
    def get(path: str) -> httpx.Response:
        return httpx.get(f"{api_base}{path}", headers=bearer(), timeout=10)

    job = get("/api/jobs/api-failed").json()
    assert job["job"]["status"] == "failed"
    assert job["trace_url"] == f"http://localhost:16686/trace/{TRACE}"
    assert job["executions"][0]["error"] == "no webhook endpoint x"
    failed = get("/api/jobs?status=failed").json()
    assert [j["id"] for j in failed["jobs"]] == ["api-failed"]
    dead = get("/api/dead?queue=webhook").json()
    assert [d["job_id"] for d in dead["letters"]] == ["dead-2", "dead-1", "dead-0"]
    workers = get("/api/workers").json()["workers"]
    assert [(w["consumer"], w["live"], w["pending"]) for w in workers] == [("api-worker", True, 1)]
    assert workers[0]["held"][0]["job_id"] == "held"


@SCHEMA.parametrize()
@hypothesis.settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_operation_conforms_to_its_description(case: Any, api_base: str):
    case.call_and_validate(base_url=api_base, headers=bearer(), timeout=60)

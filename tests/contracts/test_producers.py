"""A producer in another language: Node.js with ioredis publishes a job now and one delayed,
each with a W3C `traceparent`, following the README's contract; the committed JSON Schemas
accept what it wrote, `jobstream job` knows both before a worker runs them, and a worker
runs both inside the producer's trace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from jobstream.consumers.cli import ops
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from tests.helpers import (
    event,
    eventually,
    in_memory_spans,
    jobstream,
    run,
    running,
    with_settings,
)

NODE_DIR = Path(__file__).parents[1] / "node"
SCHEMAS = Path(__file__).resolve().parents[2] / "schema" / "jsonschema"


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary, with ioredis installed in tests/node (from its lock) when missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Node.js producer test needs both")
    if not (NODE_DIR / "node_modules" / "ioredis").is_dir():
        try:
            out = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)],
                capture_output=True,
                text=True,
                timeout=100,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci did not finish in 100 s: ioredis could not be installed")
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"npm ci failed, ioredis could not be installed: {last}")
    return node


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with in_memory_spans() as exporter:
        yield exporter


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


async def test_a_node_producer_job_runs_in_its_trace(
    deps: Deps, node: str, env_for, spans: InMemorySpanExporter
):
    s, keys = deps.settings, deps.keys
    now_payload = msgspec.json.encode(event("evt-node-now")).decode()
    later_payload = msgspec.json.encode(event("evt-node-later", "click")).decode()
    out = await run(
        node, str(NODE_DIR / "producer.js"), s.redis_url, s.stream_prefix, s.job_prefix,
        "analytics", "node-now", now_payload, "node-later", later_payload, "1500",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)

    # What Node wrote, as the committed schemas describe it.
    entries: Any = await deps.redis.xrange(keys.stream("analytics"))
    members: Any = await deps.redis.zrange(keys.delayed("analytics"), 0, -1)
    assert len(entries) == 1
    assert len(members) == 1
    written = [{k.decode(): v.decode() for k, v in entries[0][1].items()}, json.loads(members[0])]
    envelope, analytics = validator("envelope.json"), validator("analytics.json")
    for fields in written:
        envelope.validate(fields)
        analytics.validate(json.loads(fields["payload"]))

    # Before any worker runs them, `jobstream job` knows both: hash, and where each waits.
    env = env_for()
    now = json.loads((await jobstream(env, "job", "node-now", "--json")).stdout)
    assert now["job"] is None
    assert now["hash"]["status"] == "queued"
    assert now["waiting"] == [
        {
            "queue": "analytics",
            "where": "stream",
            "entry_id": sent["entryId"],
            "due_at": None,
            "attempt": "1",
            "traceparent": f"00-{sent['traceId']}-{sent['spans']['node-now']}-01",
        }
    ]
    later = await jobstream(env, "job", "node-later")
    assert later.returncode == 0, later.stdout + later.stderr
    assert "not run by a worker yet" in later.stdout
    assert "delayed" in later.stdout

    # Each job alone (analytics takes batches; a batch's span links to its jobs' producers
    # instead of being their child): this test follows one job's trace from Node.js.
    alone = with_settings(deps, policies='{"analytics": {"batch_size": 1}}')
    async with running(make_engine(alone, ["analytics"])):

        async def done() -> bool:
            rows = await deps.pool.fetch(
                "SELECT id FROM jobs WHERE id = ANY($1::text[]) AND status = 'completed'",
                ["node-now", "node-later"],
            )
            return len(rows) == 2

        await eventually(done, timeout_s=20)

    stream = keys.stream("analytics")
    process = {
        str((sp.attributes or {})["messaging.message.conversation_id"]): sp
        for sp in spans.get_finished_spans()
        if sp.name == f"process {stream}"
    }
    assert set(process) == {"node-now", "node-later"}
    for job_id, span in process.items():
        producer_span = int(sent["spans"][job_id], 16)
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == int(sent["traceId"], 16)
        assert span.parent is not None
        assert span.parent.is_remote
        assert span.parent.span_id == producer_span
        assert [link.context.span_id for link in span.links] == [producer_span]
    assert await deps.redis.hget(keys.job("node-later"), "status") == b"completed"


async def test_job_lookup_finds_a_job_wherever_a_producer_left_it(deps: Deps, env_for):
    """A bare XADD, a bare delayed member, a bare status hash: each is a known job."""
    r, keys = deps.redis, deps.keys
    payload = msgspec.json.encode(event("evt-bare")).decode()
    await r.xadd(keys.stream("webhook"), {"id": "bare-stream", "payload": "{}", "attempt": "2"})
    for n in range(30):  # the scan pages through the newest entries
        await r.xadd(keys.stream("analytics"), {"id": f"other-{n}", "payload": payload})
    no_id = (await r.xadd(keys.stream("analytics"), {"payload": payload})).decode()
    member = json.dumps({"payload": payload, "id": "bare-delayed", "attempt": 1})
    await r.zadd(keys.delayed("analytics"), {member: 1_798_761_600_000})
    await r.zadd(keys.delayed("analytics"), {"not json": 1})
    await r.hset(keys.job("bare-hash"), mapping={"status": "queued", "queue": "bounce"})

    stream_only = await ops.job_info(deps, "bare-stream")
    assert stream_only is not None
    assert stream_only["hash"] == {}
    [hit] = stream_only["waiting"]
    assert (hit["queue"], hit["where"], hit["attempt"]) == ("webhook", "stream", "2")
    by_entry_id = await ops.job_info(deps, no_id)  # no `id` field: the entry ID is the job id
    assert by_entry_id is not None
    assert [w["entry_id"] for w in by_entry_id["waiting"]] == [no_id]
    delayed = await ops.job_info(deps, "bare-delayed")
    assert delayed is not None
    assert delayed["waiting"] == [
        {
            "queue": "analytics",
            "where": "delayed",
            "entry_id": None,
            "due_at": "2027-01-01T00:00:00.000Z",
            "attempt": "1",
            "traceparent": None,
        }
    ]
    hash_only = await ops.job_info(deps, "bare-hash")
    assert hash_only is not None
    assert (hash_only["job"], hash_only["waiting"]) == (None, [])
    assert hash_only["hash"]["status"] == "queued"
    assert await ops.job_info(deps, "nowhere") is None
    past_the_limit = await ops.job_info(deps, "other-0", scan_limit=10)
    assert past_the_limit is not None
    assert (past_the_limit["waiting"], past_the_limit["complete"]) == ([], False)
    found_within = await ops.job_info(deps, "other-25", scan_limit=10)
    assert found_within is not None
    assert [w["queue"] for w in found_within["waiting"]] == ["analytics"]

    env = env_for()
    shown = await jobstream(env, "job", "bare-stream")
    assert shown.returncode == 0, shown.stderr
    assert "not run by a worker yet" in shown.stdout
    assert "webhook" in shown.stdout
    missing = await jobstream(env, "job", "nowhere")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "jobstream: no job 'nowhere' in PostgreSQL, Redis or the queues"
    )

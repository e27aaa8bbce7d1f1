"""A worker under `opentelemetry-instrument` with the redis and asyncpg instrumentations:
its own polling makes no spans (no root span a command), and a handler's SQL nests under
the job's `process` span.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from bench.otlp_sink import OtlpSink, ReceivedSpan
from jobstream.consumers.worker.deps import Deps
from tests.helpers import event

BIN = Path(sys.executable).parent
TRACE_ID, PRODUCER_SPAN = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"


def _db(span: ReceivedSpan) -> str | None:
    """The database an instrumentation's span talks to (either conventions' key)."""
    value = span.attributes.get("db.system.name") or span.attributes.get("db.system")
    return None if value is None else str(value)


async def test_worker_polling_makes_no_spans_and_handler_sql_nests_under_process(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    instrument = shutil.which("opentelemetry-instrument", path=str(BIN))
    if instrument is None:
        pytest.skip("opentelemetry-instrument is not installed (the dev extra brings it)")
    stream = deps.keys.stream("analytics")
    for i in range(3):
        payload = msgspec.json.encode(event(f"evt-auto-{i}"))
        await deps.redis.xadd(
            stream,
            {
                "id": f"auto-{i}",
                "payload": payload,
                "traceparent": f"00-{TRACE_ID}-{PRODUCER_SPAN}-01",
            },
        )
    with OtlpSink(keep=True) as sink:
        env = env_for(
            OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
            OTEL_SERVICE_NAME="jobstream-auto-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        for name in (
            "OTEL_TRACES_SAMPLER",
            "OTEL_SDK_DISABLED",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS",
        ):
            env.pop(name, None)
        proc = await asyncio.create_subprocess_exec(
            instrument, str(BIN / "jobstream"), "worker", "--processes", "1", "--burst",
            "--queues", "analytics",
            env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
    spans = sink.spans
    names = sorted(s.name for s in spans)
    # One span per job, or one per batch of a batch handler, linked to every producer.
    process = [s for s in spans if s.name == f"process {stream}"]
    assert process, names
    for span in process:
        assert span.parent_span_id == PRODUCER_SPAN or (TRACE_ID, PRODUCER_SPAN) in span.links
    by_id = {s.span_id: s for s in spans}
    # The instrumentations ran: the handlers' SQL is there, a child of its job's span.
    sql = [s for s in spans if _db(s) == "postgresql"]
    assert sql, names
    for span in sql:
        parent = by_id.get(span.parent_span_id)
        assert parent is not None, (span.name, span.parent_span_id)
        assert parent.name == f"process {stream}", (span.name, parent.name)
    # Nothing the engine did on its own (reads, heartbeats, reclaims, promotion, flushes,
    # start-up) made a span: the only spans without a parent here are jobs' spans.
    roots = [(s.name, s.attributes.get("db.statement")) for s in spans
             if not s.parent_span_id and s.name != f"process {stream}"]  # fmt: skip
    assert roots == []

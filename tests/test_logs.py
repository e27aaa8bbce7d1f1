"""Logs: trace and span ids on every record inside a span; JSON lines for log shippers."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumers.deps import Deps
from consumers.logs import JsonFormatter, TextFormatter, TraceContextFilter
from consumers.runtime import make_engine
from streams import Publisher
from tests.conftest import eventually, running
from tests.helpers import event
from tests.test_tracing import QUEUE, Step, completed, step_log, traced_step
from tests.tracing_helpers import in_memory_spans

KEYS = {"time", "level", "logger", "message", "trace_id", "span_id"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with in_memory_spans() as exporter:
        yield exporter


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go, filtered and JSON-formatted, into a string."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield log, out
    finally:
        log.removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_current_trace_and_span(
    spans: InMemorySpanExporter, captured: tuple[logging.Logger, io.StringIO]
):
    log, out = captured
    log.info("outside %s", "any span")
    with trace.get_tracer("tests").start_as_current_span("work") as span:
        log.warning("inside")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    outside, inside, failed = _lines(out)
    assert set(outside) == KEYS
    assert outside["message"] == "outside any span"
    assert outside["level"] == "INFO"
    assert outside["trace_id"] is None
    assert outside["span_id"] is None
    assert outside["time"].endswith("Z")
    assert outside["logger"] == "tests.logs"
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "ValueError: boom" in failed["exception"]


def test_text_format_appends_the_ids_only_inside_a_span(spans: InMemorySpanExporter):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    TraceContextFilter().filter(record)
    assert TextFormatter().format(record).endswith("INFO x hello")
    with trace.get_tracer("tests").start_as_current_span("work") as span:
        TraceContextFilter().filter(record)
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert f"hello trace_id={trace_id} span_id=" in TextFormatter().format(record)


async def test_a_handlers_log_lines_lead_to_the_jobs_trace(deps: Deps, spans: InMemorySpanExporter):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter())
    step_log.addHandler(handler)
    step_log.setLevel(logging.INFO)
    try:
        publisher = Publisher(deps.redis, deps.keys, {QUEUE: Step})
        job_id = await publisher.publish(QUEUE, Step())
        async with running(make_engine(deps, [], extra=[traced_step])):
            await eventually(completed(deps, job_id))
    finally:
        step_log.removeHandler(handler)
    (line,) = _lines(out)
    process = next(s for s in spans.get_finished_spans() if s.name.startswith("process "))
    assert line["message"] == f"step of job {job_id}"
    assert line["trace_id"] == format(process.context.trace_id, "032x")


async def test_worker_log_format_json_writes_one_object_a_line(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    await deps.publisher.publish("analytics", event("evt-log-1"), "log-1")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jobstream"), "--log-level", "INFO",
        "worker", "--burst", "--queues", "analytics", "--log-format", "json",
        env=env_for(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [msgspec.json.decode(line) for line in err.decode().splitlines()]
    assert lines
    assert all(set(line) >= KEYS for line in lines)
    messages = [line["message"] for line in lines]
    assert any("job completed job=log-1" in m for m in messages), messages

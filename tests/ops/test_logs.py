"""Logs: trace and span ids on every record inside a span; JSON lines for log shippers."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
from jobstream.otel.logs import JsonFormatter, TextFormatter, TraceContextFilter
from jobstream.streams import Publisher
from tests.helpers import (
    QUEUE,
    Step,
    completed,
    event,
    eventually,
    in_memory_spans,
    jobstream,
    running,
    step_log,
    traced_step,
)

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
        async with running(make_engine(deps, handlers=[traced_step])):
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


FORGED = "2026-11-30 10:00:00,000 INFO streams.jobs job completed job=forged queue=analytics"
HOSTILE = [
    f"nl\n{FORGED}",
    f"cr\r{FORGED}",
    f"crlf\r\n{FORGED}",
    f"ls\u2028{FORGED}",
    f"ps\u2029{FORGED}",
    f"nel\x85{FORGED}",
    f"vt\x0b{FORGED}",
    f"esc\x1b[2K\x1b[1G{FORGED}",
    f"bidi\u202e{FORGED}",
]
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


async def _hostile_entries(deps: Deps, n: int) -> tuple[list[str], list[str]]:
    """XADD, as any producer may: hostile job ids on valid analytics events, and hostile
    mailbox ids that the sending handler quotes in its error. Returns the job ids and the
    entry ids (an id with a control character is refused: its job is its entry id)."""
    ids, entries = [], []
    base = 1_700_000_000_000 + n * 10  # distinct entry ids across the two streams
    for i, text in enumerate(HOSTILE):
        job_id = f"{n}-{i}-{text}"
        payload = msgspec.json.encode(event(f"evt-{n}-{i}")).decode()
        entry = await deps.redis.xadd(
            deps.keys.stream("analytics"), {"id": job_id, "payload": payload}, id=f"{base}-{i}"
        )
        send = {"mailbox_id": f"mb-{text}", "to": ["r@example.net"], "subject": "s", "text": "t"}
        sent = await deps.redis.xadd(
            deps.keys.stream("email-sending"),
            {"id": f"send-{job_id}", "payload": msgspec.json.encode(send).decode()},
            id=f"{base + 1}-{i}",
        )
        ids += [job_id, f"send-{job_id}"]
        entries += [entry.decode(), sent.decode()]
    return ids, entries


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_hostile_ids_and_errors_cannot_forge_a_log_line(
    deps: Deps, env_for: Callable[..., dict[str, str]], fmt: str
):
    ids, entries = await _hostile_entries(deps, 1)
    consumer = f"w-{HOSTILE[0]}"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jobstream"), "--log-level", "DEBUG",
        "worker", "--processes", "1", "--burst", "--queues", "analytics", "email-sending",
        "--log-format", fmt,
        env=env_for(JOBSTREAM_CONSUMER_NAME=consumer), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, raw = await asyncio.wait_for(proc.communicate(), 60)
    err = raw.decode()
    assert proc.returncode == 0, err
    rows = await deps.pool.fetch(
        "SELECT id, status FROM jobs WHERE stream_entry_id = ANY($1)", entries
    )
    assert len(rows) == len(entries)  # one row per entry, whatever its id holds
    accepted = [i for i in ids if not CONTROL.search(i)]  # the others are refused as ids
    done = {r["id"]: r["status"] for r in rows}
    assert all(done[i] == ("failed" if i.startswith("send-") else "completed") for i in accepted)
    assert sorted(done.values()) == sorted(
        ["completed"] * (len(accepted) // 2) + ["failed"] * (len(ids) - len(accepted) // 2)
    )
    lines = err.split("\n")[:-1]
    assert err.splitlines() == lines  # no character any reader takes for a line break
    if fmt == "text":
        assert all(RECORD.match(line) for line in lines), lines
        messages = [line.split(" ", 4)[4] for line in lines]  # after date, time, level, name
    else:
        records = [msgspec.json.decode(line) for line in lines]
        messages = [r["message"] for r in records]
        # JSON keeps the producer's text exactly, escaped inside the string.
        for job_id in accepted:
            assert any(f"job completed job={job_id} " in m for m in messages) or any(
                f"job failed job={job_id} " in m for m in messages
            ), job_id
        printable = next(h for h in HOSTILE if not CONTROL.search(h))  # others: refused ids
        assert any(f"no mailbox mb-{printable}" in m for m in messages)
        assert any(f"worker {consumer} started" in m for m in messages)
    ended = ("job completed job=", "job failed job=", "job invalid job=")
    assert len([m for m in messages if m.startswith(ended)]) == len(entries)
    assert not [m for m in messages if m.startswith("job completed job=forged")]


def test_text_format_escapes_every_field(spans: InMemorySpanExporter):
    hostile = "\n".join(HOSTILE)
    record = logging.LogRecord(
        f"name{HOSTILE[0]}", logging.ERROR, __file__, 1, "job=%s", (hostile,), None
    )
    try:
        raise ValueError(f"boom {HOSTILE[1]}")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.levelname = f"ERROR{HOSTILE[2]}"
    TraceContextFilter().filter(record)
    line = TextFormatter().format(record)
    assert line.splitlines() == [line]
    assert "\\n2026-11-30" in line
    assert "\\r2026" in line
    assert "\\u2028" in line
    assert "\\x1b[2K" in line
    assert "| Traceback (most recent call last):\\n" in line
    assert "ValueError: boom cr\\r2026" in line
    json_line = JsonFormatter().format(record)
    assert json_line.splitlines() == [json_line]
    decoded = msgspec.json.decode(json_line)
    assert decoded["message"] == f"job={hostile}"
    assert f"ValueError: boom {HOSTILE[1]}" in decoded["exception"]


def test_json_format_survives_a_lone_surrogate():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "id=%s", ("a\ud800b",), None)
    decoded = msgspec.json.decode(JsonFormatter().format(record))
    assert decoded["message"] == "id=a\\ud800b"
    assert "\\ud800" in TextFormatter().format(record)


async def test_a_hostile_queue_name_is_refused_in_one_escaped_line(env_for):
    name = HOSTILE[0]
    policies = msgspec.json.encode({name: {"max_attempts": 2}}).decode()
    outs = await asyncio.gather(
        jobstream(env_for(), "worker", "--queues", name),
        jobstream(env_for(JOBSTREAM_POLICIES=policies), "worker", "--burst"),
        jobstream(env_for(), "publish", name, "{}"),
    )
    for out in outs:
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [out.stderr.rstrip("\n")], out.stderr
        assert "\\n2026-11-30" in out.stderr

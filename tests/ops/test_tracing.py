"""Traces: one trace from the producer through the job and the jobs it publishes, retries
and errors visible, and a worker configured only by `OTEL_*` exporting by OTLP/HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bench.otlp_sink import OtlpSink
from jobstream import otel
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import make_engine
from jobstream.otel.logs import TraceContextFilter
from jobstream.otel.tracing import make_resource, setup_tracing
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import Engine, Publisher
from tests.helpers import (
    QUEUE,
    Step,
    completed,
    event,
    eventually,
    in_memory_spans,
    running,
    traced_step,
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with in_memory_spans() as exporter:
        yield exporter


def _engine(deps: Deps) -> Engine:
    return make_engine(deps, ["analytics", QUEUE], handlers=(*HANDLERS, traced_step))


def _publisher(deps: Deps) -> Publisher:
    return Publisher(deps.redis, deps.keys, {**PAYLOADS, QUEUE: Step})


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_published_then_processed_job_is_one_trace(deps: Deps, spans: InMemorySpanExporter):
    stream = deps.keys.stream("analytics")
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request") as request:
        job_id = await deps.publisher.publish("analytics", event("evt-trace-1"))
    engine = _engine(deps)
    async with running(engine):
        await eventually(completed(deps, job_id))
    entry_id = await deps.pool.fetchval("SELECT stream_entry_id FROM jobs WHERE id = $1", job_id)

    finished = spans.get_finished_spans()
    send, process = one(finished, f"send {stream}"), one(finished, f"process {stream}")
    trace_id = request.get_span_context().trace_id
    assert send.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert send.context.trace_id == process.context.trace_id == trace_id
    assert parent_of(send) == request.get_span_context().span_id
    assert parent_of(process) == send.context.span_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert send.attributes is not None
    assert process.attributes is not None
    url = urllib.parse.urlsplit(deps.settings.redis_url)
    server = {"server.address": url.hostname, "server.port": url.port or 6379}
    assert dict(send.attributes) == {
        "messaging.system": "redis",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": stream,
        "messaging.message.id": entry_id,  # one message: its id, and no batch count
        "messaging.message.conversation_id": job_id,
        **server,
    }
    assert dict(process.attributes) == {
        "messaging.system": "redis",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": stream,
        "messaging.consumer.group.name": "workers",
        "messaging.client.id": engine.cfg.consumer,
        "messaging.message.id": entry_id,
        "messaging.message.conversation_id": job_id,
        "jobstream.delivery_count": 1,  # ours, outside messaging.*
        "jobstream.job.attempt": 1,
        **server,
    }
    assert process.status.status_code is StatusCode.UNSET


async def test_a_batch_send_counts_its_messages_and_a_single_send_names_its_message(
    deps: Deps, spans: InMemorySpanExporter
):
    stream = deps.keys.stream("analytics")
    ids = await deps.publisher.publish_many(
        "analytics", [event(f"evt-batch-{i}") for i in range(3)]
    )
    await deps.publisher.publish("analytics", event("evt-later"), "later-1", delay_s=60)
    batch, delayed = spans.get_finished_spans()
    assert batch.name == delayed.name == f"send {stream}"
    assert batch.attributes is not None
    assert delayed.attributes is not None
    assert batch.attributes["messaging.batch.message_count"] == 3
    assert batch.attributes["messaging.operation.name"] == "send"
    assert "messaging.message.id" not in batch.attributes  # one span, three messages
    assert "messaging.message.conversation_id" not in batch.attributes
    entries = await deps.redis.xrange(stream)
    assert [f[b"id"].decode() for _, f in entries] == ids
    # A delayed job has no stream entry yet: its span names the job, not an entry.
    assert "messaging.batch.message_count" not in delayed.attributes
    assert "messaging.message.id" not in delayed.attributes
    assert delayed.attributes["messaging.message.conversation_id"] == "later-1"


async def test_failed_then_retried_job_shows_error_retry_event_and_second_attempt(
    deps: Deps, spans: InMemorySpanExporter
):
    stream = deps.keys.stream(QUEUE)
    job_id = await _publisher(deps).publish(QUEUE, Step(fail_times=1))
    async with running(_engine(deps)):
        await eventually(completed(deps, job_id))

    finished = spans.get_finished_spans()
    send = one(finished, f"send {stream}")
    attempts = sorted(
        (s for s in finished if s.name == f"process {stream}"), key=lambda s: s.start_time or 0
    )
    assert len(attempts) == 2
    first, second = attempts
    for attempt in attempts:  # both attempts: children of the producer, linked to it
        assert attempt.context.trace_id == send.context.trace_id
        assert parent_of(attempt) == send.context.span_id
        assert [link.context.span_id for link in attempt.links] == [send.context.span_id]
    assert first.status.status_code is StatusCode.ERROR
    assert "transient failure on attempt 1" in (first.status.description or "")
    assert first.attributes is not None
    assert first.attributes["error.type"] == "RetryableError"
    events = {e.name: e for e in first.events}
    assert set(events) == {"exception", "retry scheduled"}
    assert events["exception"].attributes is not None
    assert str(events["exception"].attributes["exception.type"]).endswith("RetryableError")
    assert first.attributes["jobstream.job.attempt"] == 1
    assert second.status.status_code is StatusCode.UNSET
    assert not second.events
    assert second.attributes is not None
    assert second.attributes["jobstream.job.attempt"] == 2
    steps = sorted((s for s in finished if s.name == "step"), key=lambda s: s.start_time or 0)
    assert [parent_of(s) for s in steps] == [first.context.span_id, second.context.span_id]
    assert steps[0].status.status_code is StatusCode.ERROR  # the exception left the step too
    assert steps[1].kind is SpanKind.INTERNAL


async def test_job_that_publishes_another_continues_the_trace(
    deps: Deps, spans: InMemorySpanExporter
):
    outer, inner = deps.keys.stream(QUEUE), deps.keys.stream("analytics")
    job_id = await _publisher(deps).publish(QUEUE, Step(fan_out="evt-fan-1"))
    async with running(_engine(deps)):
        await eventually(completed(deps, job_id, "job-evt-fan-1"))

    finished = spans.get_finished_spans()
    send_outer, process_outer = one(finished, f"send {outer}"), one(finished, f"process {outer}")
    send_inner, process_inner = one(finished, f"send {inner}"), one(finished, f"process {inner}")
    chain = [send_outer, process_outer, send_inner, process_inner]
    assert {s.context.trace_id for s in chain} == {send_outer.context.trace_id}
    assert send_outer.parent is None  # the test's publish started the trace
    assert parent_of(process_outer) == send_outer.context.span_id
    assert parent_of(send_inner) == process_outer.context.span_id
    assert parent_of(process_inner) == send_inner.context.span_id
    assert [link.context.span_id for link in process_inner.links] == [send_inner.context.span_id]
    assert parent_of(one(finished, "step")) == process_outer.context.span_id


async def test_entry_without_traceparent_starts_a_new_trace(
    deps: Deps, spans: InMemorySpanExporter
):
    stream = deps.keys.stream("analytics")
    payload = msgspec.json.encode(event("evt-bare-trace"))
    await deps.redis.xadd(stream, {"id": "bare-1", "payload": payload})
    ambient = trace.get_tracer("tests").start_span("ambient")
    with trace.use_span(ambient, end_on_exit=True):  # the engine runs inside some other span
        async with running(_engine(deps)):
            await eventually(completed(deps, "bare-1"))
    process = one(spans.get_finished_spans(), f"process {stream}")
    assert process.parent is None
    assert not process.links
    assert process.context.trace_id != ambient.get_span_context().trace_id


def test_span_helper_is_a_no_op_when_tracing_is_off():
    with otel.span("off", {"a.b": 1}, c="d") as current:
        assert not current.is_recording()
        assert not current.get_span_context().is_valid


def test_setup_installs_nothing_without_an_endpoint_or_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    handle = setup_tracing("1.2.3", "c-1")
    assert not handle.enabled
    assert not otel.is_recording_enabled()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not setup_tracing("1.2.3", "c-1").enabled
    assert not otel.is_recording_enabled()
    handle.shutdown()  # a no-op handle shuts down quietly


def test_resource_names_service_version_host_and_consumer(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    attrs = make_resource("1.2.3", "host-1-abc").attributes
    assert attrs["service.name"] == "jobstream"
    assert attrs["service.version"] == "1.2.3"
    assert attrs["service.instance.id"] == "host-1-abc"
    assert attrs["host.name"]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "mail-workers")
    assert make_resource("1.2.3", None).attributes["service.name"] == "mail-workers"


async def test_worker_configured_by_otel_env_exports_the_producers_trace(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    stream = deps.keys.stream("analytics")
    payload = msgspec.json.encode(event("evt-otlp-1"))
    await deps.redis.xadd(
        stream,
        {"id": "otlp-1", "payload": payload, "traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    with OtlpSink(keep=True) as sink:
        env = env_for(
            OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_SERVICE_NAME="jobstream-otlp-test",
            OTEL_METRIC_EXPORT_INTERVAL="600000",
        )
        for name in ("OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
            env.pop(name, None)
        jobstream = str(Path(sys.executable).parent / "jobstream")
        proc = await asyncio.create_subprocess_exec(
            jobstream, "worker", "--burst", "--queues", "analytics", env=env,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
    assert await completed(deps, "otlp-1")()
    process = [s for s in sink.spans if s.name == f"process {stream}"]
    assert len(process) == 1, [s.name for s in sink.spans]
    span = process[0]
    assert span.kind == 5  # SPAN_KIND_CONSUMER
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
    assert span.links == [(trace_id, parent_id)]
    assert span.attributes["messaging.message.conversation_id"] == "otlp-1"
    assert span.resource["service.name"] == "jobstream-otlp-test"
    assert str(span.resource["service.instance.id"]).startswith(os.uname().nodename)
    assert span.resource["service.version"]


async def test_invalid_entry_and_job_log_lines_are_traced(
    deps: Deps, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="streams.jobs")
    caplog.handler.addFilter(TraceContextFilter())  # as the worker's log handler does
    stream = deps.keys.stream("analytics")
    await deps.redis.xadd(stream, {"id": "broken-1", "payload": "{not json"})
    good = await _publisher(deps).publish("analytics", event("evt-logged"), "logged-1")
    async with running(_engine(deps)):
        await eventually(completed(deps, good))

        async def broken_failed() -> bool:
            status = await deps.pool.fetchval("SELECT status FROM jobs WHERE id = 'broken-1'")
            return bool(status == "failed")

        await eventually(broken_failed)
    finished = spans.get_finished_spans()
    broken = [
        s for s in finished
        if s.attributes and s.attributes.get("messaging.message.conversation_id") == "broken-1"
    ]  # fmt: skip
    assert len(broken) == 1
    assert broken[0].status.status_code is StatusCode.ERROR
    assert "not JSON" in (broken[0].status.description or "")
    assert [e.name for e in broken[0].events] == ["dead-lettered"]
    process = [
        s for s in finished
        if s.kind is SpanKind.CONSUMER and s.attributes
        and s.attributes.get("messaging.message.conversation_id") == good
    ]  # fmt: skip
    trace_id = format(process[0].context.trace_id, "032x")
    lines = [r for r in caplog.records if r.name == "streams.jobs" and "job=logged-1" in r.message]
    assert [r.message.split()[1] for r in lines] == ["started", "completed"]
    assert all(getattr(r, "trace_id", None) == trace_id for r in lines)

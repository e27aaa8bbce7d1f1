"""Metrics: the observer's instruments, the Prometheus endpoint, and a worker scraped live."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from jobstream.consumers.worker.deps import Deps
from jobstream.otel.metrics import OtelObserver, setup_metrics
from jobstream.streams.observe import Observer
from tests.helpers import event, eventually


def _points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[Any, ...], Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, dict[tuple[Any, ...], Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    key = tuple(sorted((p.attributes or {}).items()))
                    value = p if isinstance(p, HistogramDataPoint) else p.value
                    out.setdefault(metric.name, {})[key] = value
    return out


def test_observer_counts_by_queue_and_outcome():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    observer: Observer = OtelObserver(provider.get_meter("test"))
    for outcome, seconds in [("completed", 0.01), ("completed", 0.02), ("retrying", 0.5)]:
        observer.job_started("analytics")
        observer.job_finished("analytics", outcome, seconds)
    observer.job_started("webhook")
    observer.job_finished("analytics", "skipped", 0.0)  # never started: changes no gauge
    observer.queue_stats("analytics", 4, 7, 2)
    points = _points(reader)
    q, done, retry = ("queue", "analytics"), ("outcome", "completed"), ("outcome", "retrying")
    assert points["jobstream.jobs.processed"] == {
        (done, q): 2,
        (retry, q): 1,
        (("outcome", "skipped"), q): 1,
    }
    assert points["jobstream.jobs.retries"] == {(q,): 1}
    assert points["jobstream.jobs.in_flight"] == {(q,): 0, (("queue", "webhook"),): 1}
    assert points["jobstream.job.duration"][(done, q)].count == 2
    assert points["jobstream.job.duration"][(done, q)].sum == pytest.approx(0.03)
    assert (("outcome", "skipped"), q) not in points["jobstream.job.duration"]
    assert points["jobstream.queue.pending"] == {(q,): 4}
    assert points["jobstream.queue.lag"] == {(q,): 7}
    assert points["jobstream.queue.dead_letters"] == {(q,): 2}
    provider.shutdown()


def test_no_reader_configured_means_no_observer(monkeypatch: pytest.MonkeyPatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    handle = setup_metrics("1.0", "c-1", prometheus=False)
    assert handle.observer is None
    assert handle.provider is None


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_prometheus_endpoint_serves_the_text_format(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    handle = setup_metrics("1.0", "c-1", prometheus=True)
    assert handle.observer is not None
    handle.observer.job_started("analytics")
    handle.observer.job_finished("analytics", "failed", 0.2)
    port = await handle.serve(0, "127.0.0.1")
    try:
        status, body = await _get(port, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert 'jobstream_jobs_processed_total{outcome="failed",queue="analytics"} 1.0' in body
        assert 'jobstream_job_duration_seconds_count{outcome="failed",queue="analytics"} 1.0' in (
            body
        )
        assert (await _get(port, "/"))[0] == "HTTP/1.1 404 Not Found"
    finally:
        await handle.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(body: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", body, re.MULTILINE)
    return float(match[1]) if match else None


async def test_worker_metrics_port_counts_processed_jobs_by_outcome(
    deps: Deps, env_for: Callable[..., dict[str, str]]
):
    stream = deps.keys.stream("analytics")
    for i in range(3):
        await deps.publisher.publish("analytics", event(f"evt-metrics-{i}"), f"m-{i}")
    await deps.redis.xadd(stream, {"id": "m-bad", "payload": b'{"event_id": 1}'})
    port = _free_port()
    env = env_for()
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jobstream"),
        "worker", "--queues", "analytics", "--metrics-port", str(port),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def scraped() -> str | None:
            try:
                _, body = await _get(port, "/metrics")
            except OSError:
                return None
            done = _sample(
                body, "jobstream_jobs_processed_total", outcome="completed", queue="analytics"
            )
            failed = _sample(
                body, "jobstream_jobs_processed_total", outcome="failed", queue="analytics"
            )
            return body if (done, failed) == (3.0, 1.0) else None

        body = await eventually(scraped, timeout_s=30, interval_s=0.2)
        assert _sample(body, "jobstream_jobs_in_flight", queue="analytics") == 0.0
        assert 'service_instance_id="' in body  # target_info names the replica
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert msgspec.json.decode(
        await deps.pool.fetchval("SELECT result FROM jobs WHERE id = 'm-0'")
    ) == {"recorded": True}

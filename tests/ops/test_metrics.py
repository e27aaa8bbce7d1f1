"""Metrics: the observer's instruments, the Prometheus endpoint, and a worker scraped live."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import make_engine
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


def _observer() -> tuple[OtelObserver, InMemoryMetricReader, MeterProvider]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    return OtelObserver(provider.get_meter("test")), reader, provider


def test_observer_counts_by_queue_and_outcome():
    observer, reader, provider = _observer()
    typed: Observer = observer
    typed.serving({"analytics": "jobs:{analytics}"}, "workers")
    for outcome, seconds, error in [
        ("completed", 0.01, None),
        ("completed", 0.02, None),
        ("retrying", 0.5, "RetryableError"),
    ]:
        typed.job_started("analytics")
        typed.job_finished("analytics", outcome, seconds, error)
    typed.job_started("webhook")
    typed.job_started("analytics")
    typed.job_finished("analytics", "skipped", 0.0)  # never ran: no duration
    typed.queue_stats("analytics", 4, 7, 2)
    typed.messages_sent("webhook", "jobs:{webhook}", 3, None)
    typed.messages_sent("webhook", "jobs:{webhook}", 1, "ConnectionError")
    points = _points(reader)
    q, done, retry = ("queue", "analytics"), ("outcome", "completed"), ("outcome", "retrying")
    assert points["jobstream.jobs.processed"] == {
        (done, q): 2,
        (retry, q): 1,
        (("outcome", "skipped"), q): 1,
        (("outcome", "failed"), q): 0,
    }
    assert points["jobstream.jobs.retries"] == {(q,): 1}
    assert points["jobstream.jobs.in_flight"] == {(q,): 0, (("queue", "webhook"),): 1}
    assert points["jobstream.queue.pending"] == {(q,): 4}
    assert points["jobstream.queue.lag"] == {(q,): 7}
    assert points["jobstream.queue.dead_letters"] == {(q,): 2}

    # The conventions' names, beside ours: messaging.process.duration replaces our histogram.
    process = {
        ("messaging.consumer.group.name", "workers"),
        ("messaging.destination.name", "jobs:{analytics}"),
        ("messaging.operation.name", "process"),
        ("messaging.system", "redis"),
    }
    durations = points["messaging.process.duration"]
    ok = tuple(sorted(process))
    failed = tuple(sorted({*process, ("error.type", "RetryableError")}))
    assert set(durations) == {ok, failed}  # the skipped job never ran: no duration
    assert durations[ok].count == 2
    assert durations[ok].sum == pytest.approx(0.03)
    assert durations[failed].count == 1
    consumed = points["messaging.client.consumed.messages"]
    assert consumed[ok] == 4  # every delivery, the skipped one included
    sent = {
        ("messaging.destination.name", "jobs:{webhook}"),
        ("messaging.operation.name", "send"),
        ("messaging.system", "redis"),
    }
    assert points["messaging.client.sent.messages"] == {
        tuple(sorted(sent)): 3,
        tuple(sorted({*sent, ("error.type", "ConnectionError")})): 1,
    }
    provider.shutdown()


def test_every_series_of_a_served_queue_exists_from_the_start_at_zero():
    observer, reader, provider = _observer()
    observer.serving({"analytics": "jobs:{analytics}", "webhook": "jobs:{webhook}"}, "workers")
    points = _points(reader)
    for queue in ("analytics", "webhook"):
        q = ("queue", queue)
        for outcome in ("completed", "retrying", "failed", "skipped"):
            assert points["jobstream.jobs.processed"][(("outcome", outcome), q)] == 0
        assert points["jobstream.jobs.retries"][(q,)] == 0
        assert points["jobstream.jobs.in_flight"][(q,)] == 0
        for cap in ("age", "entries", "bytes"):
            assert points["jobstream.dead_letters.dropped"][(("cap", cap), q)] == 0
    consumed = points["messaging.client.consumed.messages"]
    assert sorted(dict(k)["messaging.destination.name"] for k in consumed) == [
        "jobs:{analytics}",
        "jobs:{webhook}",
    ]
    assert set(consumed.values()) == {0}
    provider.shutdown()


def test_queue_gauges_withdrawn_leave_no_series():
    observer, reader, provider = _observer()
    observer.queue_stats("analytics", 4, 7, 2)
    observer.queue_stats("webhook", 1, 0, 0)
    observer.queue_stats_withdrawn("analytics")
    points = _points(reader)
    assert points["jobstream.queue.pending"] == {(("queue", "webhook"),): 1}
    provider.shutdown()


def test_no_reader_configured_means_no_observer(monkeypatch: pytest.MonkeyPatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    handle = setup_metrics("1.0", "c-1", prometheus=False)
    assert handle.observer is None
    assert handle.provider is None


async def _get(port: int, path: str = "/metrics", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", headers=headers)


async def test_prometheus_endpoint_negotiates_openmetrics_and_gzip(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    handle = setup_metrics("1.0", "c-1", prometheus=True)
    assert handle.observer is not None
    handle.observer.serving({"analytics": "jobs:{analytics}"}, "workers")
    handle.observer.job_started("analytics")
    handle.observer.job_finished("analytics", "failed", 0.2, "PermanentError")
    port = handle.serve(0)
    try:
        assert handle.server is not None
        assert handle.server.server_address[0] == "127.0.0.1"  # loopback unless configured
        plain = await _get(port, **{"Accept-Encoding": "identity"})
        assert plain.status_code == 200
        assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "content-encoding" not in plain.headers
        body = plain.text
        assert 'jobstream_jobs_processed_total{outcome="failed",queue="analytics"} 1.0' in body
        assert 'jobstream_jobs_processed_total{outcome="retrying",queue="analytics"} 0.0' in body
        assert 'jobstream_jobs_retries_total{queue="analytics"} 0.0' in body
        assert re.search(
            r'^messaging_process_duration_seconds_count\{error_type="PermanentError",.*'
            r'messaging_destination_name="jobs:\{analytics\}",.*\} 1\.0$',
            body,
            re.MULTILINE,
        ), body
        # The process and Python runtime series, as every Prometheus client exports them.
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "python_info",
            "python_gc_collections_total",
        ):
            assert re.search(rf"^{name}[{{ ]", body, re.MULTILINE), name

        om = await _get(port, Accept="application/openmetrics-text; version=1.0.0")
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")
        assert 'jobstream_jobs_processed_total{outcome="failed",queue="analytics"} 1.0' in om.text

        zipped = await _get(port, **{"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert "jobstream_jobs_processed_total" in zipped.text  # httpx inflated it
        assert int(zipped.headers["content-length"]) < len(zipped.text.encode())
    finally:
        await handle.aclose()
    assert handle.server is None
    with pytest.raises(httpx.ConnectError):
        await _get(port)


async def test_a_port_that_cannot_be_bound_is_one_line_at_start(
    env_for: Callable[..., dict[str, str]],
):
    jobstream = str(Path(sys.executable).parent / "jobstream")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # PostgreSQL is not even asked: the port fails first, whatever the database.
        env = env_for(DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
        proc = await asyncio.create_subprocess_exec(
            jobstream, "worker", "--metrics-port", str(port),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert out == b""
    assert err.decode().splitlines() == [
        f"jobstream: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]
    cases = {
        ("--metrics-port", "70000"): "argument --metrics-port: must be a port number",
        ("--metrics-port", "9464", "--metrics-host", "192.0.2.1"): (
            "cannot serve metrics on 192.0.2.1:9464: Cannot assign requested address"
        ),
    }
    for argv, expected in cases.items():
        proc = await asyncio.create_subprocess_exec(
            jobstream, "worker", *argv, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, err
        lines = err.decode().splitlines()
        assert len(lines) == 1, lines
        assert expected in lines[0]
    proc = await asyncio.create_subprocess_exec(
        jobstream, "worker", env={**env, "JOBSTREAM_METRICS_PORT": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        "jobstream: invalid configuration: JOBSTREAM_METRICS_PORT (1 to 65535) is out of range "
        "or malformed"
    ]


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
        "worker", "--processes", "1", "--queues", "analytics", "--metrics-port", str(port),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def scraped() -> str | None:
            try:
                body = (await _get(port)).text
            except httpx.TransportError:
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
        assert _sample(body, "jobstream_jobs_retries_total", queue="analytics") == 0.0
        assert 'service_instance_id="' in body  # target_info names the replica
        consumed = re.search(
            r"^messaging_client_consumed_messages_total\{.*"
            r'messaging_destination_name="[^"]*jobs:\{analytics\}".*\} (\S+)$',
            body,
            re.MULTILINE,
        )
        assert consumed is not None
        assert float(consumed[1]) == 4.0

        async def gauged() -> float | None:  # the only replica: it holds the gauges' lease
            return _sample(
                (await _get(port)).text, "jobstream_queue_dead_letters", queue="analytics"
            )

        assert await eventually(gauged, timeout_s=30, interval_s=0.2) == 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert msgspec.json.decode(
        await deps.pool.fetchval("SELECT result FROM jobs WHERE id = 'm-0'")
    ) == {"recorded": True}


async def test_queue_gauges_come_from_one_replica_at_a_time(deps: Deps):
    """Two replicas serve a queue: one reports its gauges, the other none, so a sum over
    replicas is the queue's own figure; when the reporter stops, the other takes over."""
    stream = deps.keys.stream("analytics")
    await deps.redis.xgroup_create(stream, deps.settings.group, id="0", mkstream=True)
    for i in range(5):
        await deps.redis.xadd(stream, {"id": f"lag-{i}", "payload": b"{}"})
    fast = dataclasses.replace(
        deps, settings=msgspec.structs.replace(deps.settings, trim_interval_s=0.2, block_ms=50)
    )
    replicas = []
    for name in ("replica-a", "replica-b"):
        observer, reader, provider = _observer()
        engine = make_engine(fast, ["analytics"], observer=observer, consumer=name)
        engine.lanes["analytics"].free.clear()  # reads nothing: the lag stays
        replicas.append((engine, reader, provider))

    def lags() -> list[int | None]:
        return [
            _points(reader).get("jobstream.queue.lag", {}).get((("queue", "analytics"),))
            for _, reader, _ in replicas
        ]

    (a, _, pa), (b, _, pb) = replicas
    task_a = asyncio.create_task(a.run())
    await eventually(lambda: _async(lags()[0] == 5))
    task_b = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(1.0)  # b tried to take the lease several times
        assert lags() == [5, None]  # summed over replicas: 5, the queue's own lag
        a.stop()  # the reporter stops and gives up its lease: b takes over
        await asyncio.wait_for(task_a, 30)
        await eventually(lambda: _async(lags()[1] == 5), timeout_s=10)
    finally:
        a.stop()
        b.stop()
        await asyncio.wait_for(asyncio.gather(task_a, task_b), 30)
    pa.shutdown()
    pb.shutdown()


async def _async(value: Any) -> Any:
    return value

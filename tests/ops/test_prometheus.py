"""The real Prometheus (Debian's package) scrapes a running worker, and a counter reads back
through its HTTP API; `promtool check metrics` accepts what the worker serves."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from jobstream.consumers.worker.deps import Deps
from tests.helpers import event, eventually

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Debian's prometheus is not installed: scripts/test installs it with apt-get "
    "where it can (apt-get install prometheus)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _query(client: httpx.AsyncClient, api: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector `promql` evaluates to (empty while Prometheus is starting)."""
    try:
        reply = await client.get(f"{api}/api/v1/query", params={"query": promql})
    except httpx.TransportError:
        return []
    if reply.status_code == 503:  # listening, but its storage is not ready yet
        return []
    body = reply.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def _stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err or b""


async def test_prometheus_scrapes_a_worker_and_answers_a_counter_query(
    deps: Deps, env_for: Callable[..., dict[str, str]], tmp_path: Path
):
    assert PROMETHEUS is not None
    for i in range(3):
        await deps.publisher.publish("analytics", event(f"evt-prom-{i}"), f"prom-{i}")
    metrics_port, api_port = _free_port(), _free_port()
    env = env_for()
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        env.pop(name, None)
    worker = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jobstream"),
        "worker", "--processes", "1", "--queues", "analytics", "--metrics-port", str(metrics_port),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "jobstream-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{api_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            completed = 'jobstream_jobs_processed_total{queue="analytics",outcome="completed"}'

            async def three_completed() -> list[dict[str, Any]] | None:
                result = await _query(client, api, completed)
                return result if result and result[0]["value"][1] == "3" else None

            [sample] = await eventually(three_completed, timeout_s=60, interval_s=0.5)
            assert sample["metric"]["job"] == "jobstream-worker"
            assert sample["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
            # Series that exist from the start at 0, and the process's own.
            failed = 'jobstream_jobs_processed_total{queue="analytics",outcome="failed"}'
            [zero] = await _query(client, api, failed)
            assert zero["value"][1] == "0"
            [retries] = await _query(client, api, 'jobstream_jobs_retries_total{queue="analytics"}')
            assert retries["value"][1] == "0"
            [rss] = await _query(
                client, api, 'process_resident_memory_bytes{job="jobstream-worker"}'
            )
            assert float(rss["value"][1]) > 0
            [up] = await _query(client, api, 'up{job="jobstream-worker"}')
            assert up["value"][1] == "1"
            served = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).content
    finally:
        prom_err = await _stop(prometheus)
        worker_err = await _stop(worker)
    assert worker.returncode == 0, worker_err.decode()
    assert prometheus.returncode == 0, prom_err.decode()[-2000:]
    if PROMTOOL is not None:  # Prometheus's own linter, as an operator would run it
        check = await asyncio.create_subprocess_exec(
            PROMTOOL, "check", "metrics",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(check.communicate(served), 30)
        assert check.returncode == 0, out.decode()


async def test_promtool_accepts_the_prometheus_configuration_compose_mounts():
    if PROMTOOL is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    config = ROOT / "otel" / "prometheus.yml"
    check = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 0, out.decode()
    assert "SUCCESS" in out.decode()

"""Job metrics through the OpenTelemetry metrics SDK: OTLP export from the `OTEL_*` variables
and a Prometheus text endpoint (`/metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from jobstream.otel.redact import redact_url
from jobstream.otel.tracing import make_resource, otlp_endpoint, otlp_protocol, sdk_disabled

__all__ = ["DURATION_BUCKETS_S", "MetricsHandle", "OtelObserver", "setup_metrics"]

logger = logging.getLogger(__name__)

DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
_Attrs = dict[str, str]


class OtelObserver:
    """The engine's Observer (`jobstream.streams.observe`) recording into OpenTelemetry instruments.

    The hot path only bumps plain counters and records one histogram point with an attribute
    dict bound once per (queue, outcome); the counters and gauges are read at collection.
    """

    def __init__(self, meter: Meter) -> None:
        self._processed: dict[tuple[str, str], int] = {}
        self._in_flight: dict[str, int] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._bound: dict[tuple[str, str], _Attrs] = {}
        self._duration = meter.create_histogram(
            "jobstream.job.duration",
            unit="s",
            description="Handler run time of one attempt",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        meter.create_observable_counter(
            "jobstream.jobs.processed",
            [self._observe_processed],
            unit="{job}",
            description="Attempts finished, by queue and outcome",
        )
        meter.create_observable_counter(
            "jobstream.jobs.retries",
            [self._observe_retries],
            unit="{job}",
            description="Attempts that failed and were scheduled for a retry",
        )
        meter.create_observable_counter(
            "jobstream.dead_letters.dropped",
            [self._observe_dropped],
            unit="{entry}",
            description="Dead letters removed by a cap, by queue and cap (age, entries, bytes)",
        )
        meter.create_observable_up_down_counter(
            "jobstream.jobs.in_flight",
            [self._observe_in_flight],
            unit="{job}",
            description="Jobs whose handler is running",
        )
        for name, index, what in (
            ("pending", 0, "Entries delivered to a consumer and not yet acked"),
            ("lag", 1, "Entries in the stream not yet delivered to the group"),
            ("dead_letters", 2, "Entries in the queue's dead-letter stream"),
        ):
            meter.create_observable_gauge(
                f"jobstream.queue.{name}",
                [self._stat_reader(index)],
                unit="{entry}",
                description=what,
            )

    # ---- Observer --------------------------------------------------------------------
    def job_started(self, queue: str) -> None:
        self._in_flight[queue] = self._in_flight.get(queue, 0) + 1

    def job_finished(self, queue: str, outcome: str, duration_s: float) -> None:
        key = (queue, outcome)
        self._processed[key] = self._processed.get(key, 0) + 1
        # otel imports nothing of ours: the outcomes are the text of streams.status.Outcome
        if outcome == "skipped":  # acked as already completed: it never ran
            return
        attrs = self._bound.get(key)
        if attrs is None:
            attrs = self._bound[key] = {"queue": queue, "outcome": outcome}
        self._duration.record(duration_s, attrs)
        running = self._in_flight.get(queue, 0)
        if running > 0:  # entries rejected before they ran finish without having started
            self._in_flight[queue] = running - 1

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        self._stats[queue] = (pending, lag, dead)

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        self._dropped[(queue, cap)] = self._dropped.get((queue, cap), 0) + count

    # ---- collection (runs in the reader's thread: iterate over copies) ----------------
    def _observe_processed(self, _: CallbackOptions) -> Iterable[Observation]:
        for (queue, outcome), n in self._processed.copy().items():
            yield Observation(n, {"queue": queue, "outcome": outcome})

    def _observe_retries(self, _: CallbackOptions) -> Iterable[Observation]:
        for (queue, outcome), n in self._processed.copy().items():
            if outcome == "retrying":
                yield Observation(n, {"queue": queue})

    def _observe_dropped(self, _: CallbackOptions) -> Iterable[Observation]:
        for (queue, cap), n in self._dropped.copy().items():
            yield Observation(n, {"queue": queue, "cap": cap})

    def _observe_in_flight(self, _: CallbackOptions) -> Iterable[Observation]:
        for queue, n in self._in_flight.copy().items():
            yield Observation(n, {"queue": queue})

    def _stat_reader(self, index: int) -> _StatReader:
        return _StatReader(self._stats, index)


@dataclass(frozen=True, slots=True)
class _StatReader:
    stats: dict[str, tuple[int, int, int]]
    index: int

    def __call__(self, _: CallbackOptions) -> Iterable[Observation]:
        for queue, values in self.stats.copy().items():
            yield Observation(values[self.index], {"queue": queue})


def _metric_exporter(protocol: str) -> MetricExporter:
    # Both read their endpoint, headers, timeout and TLS from OTEL_EXPORTER_OTLP_*.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter()


@dataclass(slots=True)
class MetricsHandle:
    """What `setup_metrics` built: the observer to give the engine (None: metrics off)."""

    provider: MeterProvider | None = None
    observer: OtelObserver | None = None
    registry: CollectorRegistry | None = None
    server: asyncio.Server | None = None

    async def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve `/metrics` in the Prometheus text format; return the bound port."""
        if self.registry is None:
            raise RuntimeError("metrics were set up without the Prometheus endpoint")
        self.server = await asyncio.start_server(self._serve_one, host, port)
        bound = int(self.server.sockets[0].getsockname()[1])
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            registry = self.registry
            if method in ("GET", "HEAD") and target.split("?")[0] == "/metrics" and registry:
                body = await asyncio.to_thread(generate_latest, registry)
                status, ctype = "200 OK", CONTENT_TYPE_PLAIN_0_0_4
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found: try /metrics\n"
            head_out = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head_out.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            logger.debug("metrics request dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop serving, export what is left and shut the provider down (idempotent)."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        provider, self.provider = self.provider, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown, int(timeout_s * 1000))


def setup_metrics(service_version: str, consumer: str | None, *, prometheus: bool) -> MetricsHandle:
    """A meter provider with an OTLP periodic reader (when an endpoint is configured) and a
    Prometheus reader (when `prometheus`); no reader at all means no observer and no cost.

    The provider is not made global: only the observer records into it.
    """
    readers: list[MetricReader] = []
    registry: CollectorRegistry | None = None
    endpoint = None if sdk_disabled() else otlp_endpoint("metrics")
    if endpoint is not None:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        # The interval comes from OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
        readers.append(PeriodicExportingMetricReader(_metric_exporter(otlp_protocol("metrics"))))
        logger.info("metrics on: OTLP to %s", redact_url(endpoint))
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        registry = CollectorRegistry(auto_describe=False)
        readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))
    if not readers:
        return MetricsHandle()
    provider = MeterProvider(
        metric_readers=readers, resource=make_resource(service_version, consumer)
    )
    observer = OtelObserver(provider.get_meter("jobstream"))
    return MetricsHandle(provider, observer, registry)

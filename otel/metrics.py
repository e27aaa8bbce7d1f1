"""Job metrics through the OpenTelemetry metrics SDK: OTLP export from the `OTEL_*` variables
and a Prometheus endpoint (`/metrics`) with the process and Python runtime series beside.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from jobstream.otel.redact import redact_url
from jobstream.otel.tracing import make_resource, otlp_endpoint, otlp_protocol, sdk_disabled

__all__ = [
    "DEAD_LETTER_CAPS",
    "DURATION_BUCKETS_S",
    "OUTCOMES",
    "MetricsError",
    "MetricsHandle",
    "OtelObserver",
    "setup_metrics",
]

logger = logging.getLogger(__name__)

DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
_Attrs = dict[str, str]
OUTCOMES = ("completed", "retrying", "failed", "skipped")
DEAD_LETTER_CAPS = ("age", "entries", "bytes")


class OtelObserver:
    """The engine's Observer (`jobstream.streams.observe`) recording into OpenTelemetry instruments.

    The hot path only bumps plain counters and records one histogram point with an attribute
    dict bound once per (queue, error type); counters and gauges are read at
    collection. Every series of a queue served exists from the start, at 0.
    """

    def __init__(self, meter: Meter) -> None:
        self._streams: dict[str, str] = {}
        self._group = ""
        self._processed: dict[tuple[str, str], int] = {}
        self._consumed: dict[str, int] = {}
        self._sent: dict[tuple[str, str, str | None], int] = {}
        self._in_flight: dict[str, int] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._bound: dict[tuple[str, str | None], _Attrs] = {}
        self._duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing operation (the handler's run of one attempt)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        _counters = (
            ("jobstream.jobs.processed", "{job}", self._observe_processed,
             "Attempts finished, by queue and outcome"),
            ("jobstream.jobs.retries", "{job}", self._observe_retries,
             "Attempts that failed and were scheduled for a retry"),
            ("jobstream.dead_letters.dropped", "{entry}", self._observe_dropped,
             "Dead letters removed by a cap, by queue and cap (age, entries, bytes)"),
            ("messaging.client.consumed.messages", "{message}", self._observe_consumed,
             "Number of messages that were delivered to the application"),
            ("messaging.client.sent.messages", "{message}", self._observe_sent,
             "Number of messages producer attempted to send to the broker"),
        )  # fmt: skip
        for name, unit, callback, what in _counters:
            meter.create_observable_counter(name, [callback], unit=unit, description=what)
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
    def serving(self, streams: Mapping[str, str], group: str) -> None:
        self._streams.update(streams)
        self._group = group
        for queue in streams:
            for outcome in OUTCOMES:
                self._processed.setdefault((queue, outcome), 0)
            for cap in DEAD_LETTER_CAPS:
                self._dropped.setdefault((queue, cap), 0)
            self._consumed.setdefault(queue, 0)
            self._in_flight.setdefault(queue, 0)

    def job_started(self, queue: str) -> None:
        self._in_flight[queue] = self._in_flight.get(queue, 0) + 1
        self._consumed[queue] = self._consumed.get(queue, 0) + 1

    def job_finished(
        self, queue: str, outcome: str, duration_s: float, error_type: str | None = None
    ) -> None:
        key = (queue, outcome)
        self._processed[key] = self._processed.get(key, 0) + 1
        running = self._in_flight.get(queue, 0)
        if running > 0:  # (never below 0, whatever order a caller reports in)
            self._in_flight[queue] = running - 1
        # otel imports nothing of ours: the outcomes are the text of streams.status.Outcome
        if outcome == "skipped":  # acked as already completed: it never ran
            return
        bound = (queue, error_type)
        attrs = self._bound.get(bound)
        if attrs is None:
            attrs = self._bound[bound] = self._process_attributes(queue, error_type)
        self._duration.record(duration_s, attrs)

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        self._stats[queue] = (pending, lag, dead)

    def queue_stats_withdrawn(self, queue: str) -> None:
        self._stats.pop(queue, None)

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        self._dropped[(queue, cap)] = self._dropped.get((queue, cap), 0) + count

    def messages_sent(self, queue: str, stream: str, count: int, error_type: str | None) -> None:
        key = (queue, stream, error_type)
        self._sent[key] = self._sent.get(key, 0) + count

    def _process_attributes(self, queue: str, error_type: str | None) -> _Attrs:
        """The conventions' attributes, and no more: the SDK's cost of recording a point
        grows with each attribute, and this is paid once per job."""
        attrs = {
            "messaging.system": "redis",
            "messaging.operation.name": "process",
            "messaging.destination.name": self._streams.get(queue, queue),
        }
        if self._group:
            attrs["messaging.consumer.group.name"] = self._group
        if error_type is not None:
            attrs["error.type"] = error_type
        return attrs

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

    def _observe_consumed(self, _: CallbackOptions) -> Iterable[Observation]:
        for queue, n in self._consumed.copy().items():
            attrs = {
                "messaging.system": "redis",
                "messaging.operation.name": "process",
                "messaging.destination.name": self._streams.get(queue, queue),
                "messaging.consumer.group.name": self._group,
            }
            yield Observation(n, attrs)

    def _observe_sent(self, _: CallbackOptions) -> Iterable[Observation]:
        for (_queue, stream, error_type), n in self._sent.copy().items():
            attrs = {
                "messaging.system": "redis",
                "messaging.operation.name": "send",
                "messaging.destination.name": stream,
            }
            if error_type is not None:
                attrs["error.type"] = error_type
            yield Observation(n, attrs)

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
    server: WSGIServer | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve the registry over HTTP on `host:port` (0: any free port); return the port.

        prometheus_client's server: the text format, or OpenMetrics when the scraper's
        Accept header asks for it, gzipped when its Accept-Encoding allows. A port that
        cannot be bound raises ConfigError naming it, before any work starts.
        """
        if self.registry is None:
            raise RuntimeError("metrics were set up without the Prometheus endpoint")
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # in use, not ours to bind, or a host that does not resolve
            reason = exc.strerror or str(exc)
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {reason}") from None
        bound = int(self.server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop serving, export what is left and shut the provider down (idempotent)."""
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        provider, self.provider = self.provider, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown, int(timeout_s * 1000))


class MetricsError(ValueError):
    """The metrics endpoint could not start (a startup error, one line)."""


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
        # The usual process_* and python_* series (memory, CPU, open files, GC, version).
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    if not readers:
        return MetricsHandle()
    provider = MeterProvider(
        metric_readers=readers, resource=make_resource(service_version, consumer)
    )
    observer = OtelObserver(provider.get_meter("jobstream"))
    return MetricsHandle(provider, observer, registry)

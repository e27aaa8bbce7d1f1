"""The tracer provider, configured only from the standard `OTEL_*` variables.

No endpoint (or `OTEL_SDK_DISABLED=true`) installs nothing, so spans are skipped entirely.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.util.types import AttributeValue

from jobstream.otel.propagation import is_recording_enabled
from jobstream.otel.redact import exception_attributes, redact_url, scrub
from jobstream.otel.sampling import PresetIdGenerator

__all__ = ["TracingHandle", "make_resource", "otlp_protocol", "setup_tracing", "span"]

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("jobstream")
_TRUE = {"true", "1", "yes", "on"}


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def sdk_disabled() -> bool:
    """`OTEL_SDK_DISABLED` set to true."""
    return _env("OTEL_SDK_DISABLED").lower() in _TRUE


def otlp_endpoint(signal: str) -> str | None:
    """The OTLP endpoint for `signal` (traces, metrics), or None when none is configured."""
    if _env(f"OTEL_{signal.upper()}_EXPORTER").lower() == "none":
        return None
    return _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or (
        _env("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    )


def otlp_protocol(signal: str) -> str:
    """`grpc` or `http/protobuf` (the default of the OTLP specification)."""
    value = _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or _env(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    value = value or "http/protobuf"
    if value not in ("grpc", "http/protobuf"):
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r} is not supported (use grpc or http/protobuf)"
        )
    return value


def make_resource(service_version: str, consumer: str | None) -> Resource:
    """service.name (OTEL_SERVICE_NAME, default jobstream), version, host and consumer name."""
    attrs: dict[str, AttributeValue] = {
        "service.version": service_version,
        "host.name": socket.gethostname(),
    }
    if consumer:
        attrs["service.instance.id"] = consumer
    resource = Resource.create(attrs)  # merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "jobstream"}))
    return resource


def _span_exporter(protocol: str) -> SpanExporter:
    # Both exporters read their endpoint, headers, timeout and TLS from OTEL_EXPORTER_OTLP_*.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


@dataclass(slots=True)
class TracingHandle:
    """What `setup_tracing` installed; `shutdown()` flushes and stops it (idempotent)."""

    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self, timeout_s: float = 5.0) -> None:
        provider, self.provider = self.provider, None
        if provider is None:
            return
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def setup_tracing(service_version: str, consumer: str | None) -> TracingHandle:
    """Install a tracer provider exporting by OTLP when an endpoint is configured."""
    if sdk_disabled() or otlp_endpoint("traces") is None:
        return TracingHandle()
    if is_recording_enabled():  # the global provider can be set once per process
        logger.info("a tracer provider is already installed; keeping it")
        return TracingHandle()
    protocol = otlp_protocol("traces")
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG), the batch limits from OTEL_BSP_*.
    provider = TracerProvider(
        resource=make_resource(service_version, consumer), id_generator=PresetIdGenerator()
    )
    provider.add_span_processor(BatchSpanProcessor(_span_exporter(protocol)))
    trace.set_tracer_provider(provider)
    logger.info("tracing on: OTLP %s to %s", protocol, redact_url(otlp_endpoint("traces")))
    return TracingHandle(provider)


@contextmanager
def span(
    name: str,
    attributes: Mapping[str, AttributeValue] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    **attrs: AttributeValue,
) -> Iterator[trace.Span]:
    """A child span of the current one for a handler's own step; a no-op when tracing is off.

    Attribute names with dots go in `attributes`, plain ones as keywords. An exception
    leaving the block is recorded and marks the span as an error.
    """
    if not trace.get_current_span().is_recording() and not is_recording_enabled():
        yield trace.INVALID_SPAN
        return
    merged: dict[str, Any] = {**(attributes or {}), **attrs}
    with _tracer.start_as_current_span(
        name,
        kind=kind,
        attributes=merged,
        record_exception=False,  # recorded below, scrubbed of secrets
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            current.record_exception(exc, exception_attributes(exc), escaped=True)
            current.set_status(trace.StatusCode.ERROR, scrub(f"{type(exc).__name__}: {exc}"))
            raise

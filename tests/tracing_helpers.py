"""One in-memory tracer provider for the whole session, installed globally only per test.

The global provider can be set once per process, and the module-level proxy tracers cache
the first real tracer they see, so the same provider is installed again each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider(resource=Resource({"service.name": "jobstream-test"}))
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


def reset_global_provider() -> None:
    """Forget the global tracer provider (what the SDK's own test utilities do)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@contextmanager
def in_memory_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the block, spans kept in memory; off again after."""
    reset_global_provider()
    trace.set_tracer_provider(PROVIDER)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        EXPORTER.clear()
        reset_global_provider()


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]

"""Trace context in an entry's `traceparent`/`tracestate` fields (W3C Trace Context)."""

from __future__ import annotations

from collections.abc import MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["extract", "inject", "is_recording_enabled", "trace_id_of"]

_W3C = TraceContextTextMapPropagator()


def inject(fields: MutableMapping[str, str]) -> None:
    """Write the current span's context into `fields` (no-op without a valid span)."""
    _W3C.inject(fields)


def extract(traceparent: str | None, tracestate: str | None) -> otel_context.Context | None:
    """The producer's context from an entry's fields, or None when it carried none."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _W3C.extract(carrier)


def is_recording_enabled() -> bool:
    """Whether a real SDK tracer provider is installed (else spans are skipped entirely)."""
    provider = trace.get_tracer_provider()
    return type(provider).__module__.startswith("opentelemetry.sdk")


def trace_id_of(traceparent: str | None = None, *, sampled_only: bool = False) -> str | None:
    """The trace id (32 hex digits) of `traceparent`, or of the current span without one;
    None when there is no valid one (or, with `sampled_only`, when it is not sampled)."""
    ctx = extract(traceparent, None) if traceparent else None
    if traceparent and ctx is None:
        return None
    span_ctx = trace.get_current_span(ctx).get_span_context()
    if not span_ctx.is_valid or (sampled_only and not span_ctx.trace_flags.sampled):
        return None
    return format(span_ctx.trace_id, "032x")

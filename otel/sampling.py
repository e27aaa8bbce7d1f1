"""Deciding whether a job is sampled before any span exists, so unsampled jobs cost little.

The decision is the configured sampler's own, asked once with the trace id the span will
get: for a root span that id is handed to the SDK through `PresetIdGenerator`, so the SDK
reaches the same decision rather than drawing a second time.
"""

from __future__ import annotations

from contextvars import ContextVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision

__all__ = ["PresetIdGenerator", "presample"]

_preset: ContextVar[int] = ContextVar("jobstream_preset_trace_id", default=0)
_ids = RandomIdGenerator()


class PresetIdGenerator(RandomIdGenerator):
    """Random ids, except the trace id `presample` already chose for the next root span."""

    def generate_trace_id(self) -> int:
        preset = _preset.get()
        if preset:
            _preset.set(0)  # used once
            return preset
        return super().generate_trace_id()


def presample(parent: otel_context.Context | None, name: str) -> otel_context.Context | None:
    """None: sampled, start the span as usual. Else the context to run the job under.

    The returned context carries a non-recording span with the job's trace id and an
    unsampled flag, so what the job publishes propagates the decision downstream.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    parent_ctx = trace.get_current_span(parent).get_span_context() if parent else None
    if parent_ctx is not None and parent_ctx.is_valid:
        trace_id = parent_ctx.trace_id
        state = parent_ctx.trace_state
    else:
        trace_id, state = _ids.generate_trace_id(), None
    decision = provider.sampler.should_sample(parent, trace_id, name)
    if decision.decision is not Decision.DROP:
        if parent_ctx is None or not parent_ctx.is_valid:
            _preset.set(trace_id)  # this task's next root span gets this id
        return None
    span_ctx = trace.SpanContext(
        trace_id, _ids.generate_span_id(), is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT), trace_state=state,
    )  # fmt: skip
    return trace.set_span_in_context(trace.NonRecordingSpan(span_ctx), otel_context.Context())

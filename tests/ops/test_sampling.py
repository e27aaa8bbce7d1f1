"""Head sampling decided before any span exists: the configured sampler's own decision."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from jobstream.otel import extract, inject, presample
from jobstream.otel.sampling import PresetIdGenerator
from tests.helpers import reset_global_provider


@pytest.fixture
def ratio_provider() -> Iterator[TracerProvider]:
    provider = TracerProvider(
        sampler=ParentBasedTraceIdRatio(0.25), id_generator=PresetIdGenerator()
    )
    reset_global_provider()
    trace.set_tracer_provider(provider)
    try:
        yield provider
    finally:
        reset_global_provider()


def test_roots_are_sampled_at_the_configured_ratio(ratio_provider: TracerProvider):
    decisions = [presample(None, "process q") for _ in range(4000)]
    sampled = sum(d is None for d in decisions)
    assert 800 < sampled < 1200  # 25 % of 4000, well within chance
    dropped = [d for d in decisions if d is not None]
    ids = {trace.get_current_span(d).get_span_context().trace_id for d in dropped}
    assert len(ids) == len(dropped)  # each job its own trace


def test_a_sampled_root_span_gets_the_trace_id_that_was_decided(ratio_provider: TracerProvider):
    tracer = ratio_provider.get_tracer("t")
    for _ in range(200):
        if presample(None, "process q") is None:
            with tracer.start_as_current_span("process q") as span:
                # The SDK drew no second time: it used the decided id and kept the span.
                assert span.is_recording()
                assert span.get_span_context().trace_flags.sampled
            with tracer.start_as_current_span("next root") as other:
                assert other.get_span_context().trace_id != span.get_span_context().trace_id


def test_unsampled_parent_propagates_its_decision_downstream(ratio_provider: TracerProvider):
    parent_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    ctx = presample(extract(parent_tp, "vendor=x"), "process q")
    assert ctx is not None
    carrier: dict[str, str] = {}
    inject(carrier)  # nothing current: nothing written
    assert carrier == {}
    token = otel_context.attach(ctx)
    try:
        inject(carrier)
    finally:
        otel_context.detach(token)
    _, trace_id, _, flags = carrier["traceparent"].split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"  # the same trace
    assert flags == "00"  # still unsampled downstream
    assert carrier["tracestate"] == "vendor=x"


def test_sampled_parent_is_followed(ratio_provider: TracerProvider):
    parent_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert all(presample(extract(parent_tp, None), "process q") is None for _ in range(50))


def test_without_a_tracing_sdk_nothing_is_decided():
    reset_global_provider()
    assert presample(None, "process q") is None

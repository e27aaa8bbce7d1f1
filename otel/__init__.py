"""Tracing and metrics setup from the standard `OTEL_*` variables, and propagation helpers."""

from jobstream.otel.propagation import extract, inject, is_recording_enabled, trace_id_of
from jobstream.otel.sampling import presample
from jobstream.otel.tracing import span

__all__ = ["extract", "inject", "is_recording_enabled", "presample", "span", "trace_id_of"]

"""A minimal local OTLP/HTTP receiver: accepts traces (and metrics, logs), counts the spans.

In a process of its own: `python -m bench.otlp_sink --port 4318` (prints the count on exit);
in-process: `with OtlpSink(keep=True) as sink: ...` then `sink.spans` / `sink.span_count`.
"""

from __future__ import annotations

import argparse
import gzip
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OtlpSink", "ReceivedSpan"]


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span, decoded enough for assertions."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id), hex


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return None if which is None else getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """The spans of one `ExportTraceServiceRequest` (protobuf)."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        s.name,
                        s.kind,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        _attrs(s.attributes),
                        resource,
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    )
                )
    return out


class OtlpSink:
    """Receives OTLP/HTTP (protobuf) on loopback in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep: bool = False) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.span_count = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self, path: str, body: bytes) -> None:
        with self._lock:
            self.requests += 1
        if not path.startswith("/v1/traces"):
            return  # metrics and logs are accepted and dropped
        if not self.keep:  # counting only: no Python object per span, so the sink stays cheap
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with self._lock:
                self.span_count += n
            return
        spans = decode_spans(body)
        with self._lock:
            self.span_count += len(spans)
            self.spans.extend(spans)


def _handler_class(sink: OtlpSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            sink.received(self.path, body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with OtlpSink(port=args.port) as sink:
        print(f"OTLP/HTTP sink on {sink.endpoint}", flush=True)
        started = time.monotonic()
        while not stop.is_set():  # wakes each second so the signal handlers can run
            stop.wait(1.0)
        elapsed = time.monotonic() - started
    print(f"received {sink.span_count} spans in {sink.requests} requests over {elapsed:.1f}s")


if __name__ == "__main__":
    main()

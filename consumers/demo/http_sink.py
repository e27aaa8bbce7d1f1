"""A tiny real HTTP/1.1 server on loopback for the demo and the tests: records, answers as told."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Answer", "HttpSink", "Request", "http_sink", "verify_signature"]

MAX_BODY = 1 << 20  # a longer request body is recorded cut at this length


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    peer: str


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay_s: float = 0.0


@dataclass
class HttpSink:
    """`answers` are used in order, one per request; then `default`."""

    host: str = "127.0.0.1"
    port: int = 0
    scheme: str = "http"
    requests: list[Request] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    default: Answer = field(default_factory=Answer)

    def url(self, path: str = "/hooks", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(min(int(headers.get("content-length", "0")), MAX_BODY))
            peer = writer.get_extra_info("peername")[0]
            self.requests.append(Request(method, path, headers, body, peer))
            answer = self.answers.pop(0) if self.answers else self.default
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
            extra = "".join(f"{k}: {v}\r\n" for k, v in answer.headers.items())
            writer.write(
                f"HTTP/1.1 {answer.status} X\r\ncontent-length: {len(answer.body)}\r\n"
                f"connection: close\r\n{extra}\r\n".encode()
                + answer.body
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            return  # the client went away or sent garbage: there is nobody to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def http_sink(
    tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", answers: Sequence[Answer] = ()
) -> AsyncIterator[HttpSink]:
    """Serve HTTP (HTTPS with a `tls` context) on a free port of `host` for the block."""
    sink = HttpSink(host, scheme="https" if tls else "http", answers=list(answers))
    server = await asyncio.start_server(sink.handle, sink.host, 0, ssl=tls)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Check a Standard Webhooks signature as a customer would, from the spec, not our signer."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sigs = [s.partition(",") for s in headers.get("webhook-signature", "").split(" ")]
    return any(v == "v1" and hmac.compare_digest(sig, expected) for v, _, sig in sigs)

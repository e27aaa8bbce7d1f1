"""A tiny real HTTP/1.1 server on loopback for tests: records requests, answers as told."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


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
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
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
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away: there is nobody to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def http_sink(tls: ssl.SSLContext | None = None, **kw: object) -> AsyncIterator[HttpSink]:
    """Serve HTTP (HTTPS with a `tls` context) on a free loopback port for the block."""
    sink = HttpSink(scheme="https" if tls else "http", **kw)  # type: ignore[arg-type]
    server = await asyncio.start_server(sink.handle, sink.host, 0, ssl=tls)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()

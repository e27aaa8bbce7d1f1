"""Loopback servers for `jobstream demo`: an SMTP sink and a webhook receiver.

Both record what they receive and can be told to fail a few times first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Hook", "HookReceiver", "MailSink", "hook_receiver", "mail_sink"]


@dataclass
class MailSink:
    """SMTP sink state: messages received, recipients to refuse, DATA replies to give first."""

    port: int = 0
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    defer_data: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, _: Any
    ) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.defer_data:
            return self.defer_data.pop(0)
        data = envelope.original_content or envelope.content
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), data))
        return "250 2.0.0 queued"


@contextlib.asynccontextmanager
async def mail_sink() -> AsyncIterator[MailSink]:
    """Serve SMTP on a free loopback port (needs `aiosmtpd`, a development dependency)."""
    from aiosmtpd.smtp import SMTP  # imported here: only the demo needs it

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # one line per SMTP command
    sink = MailSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.demo", loop=loop), "127.0.0.1", 0
    )
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes

    def verify(self, secret: str) -> bool:
        """Check the Standard Webhooks signature as a customer would."""
        key = base64.b64decode(secret.removeprefix("whsec_"))
        h = self.headers
        signed = f"{h.get('webhook-id')}.{h.get('webhook-timestamp')}.".encode() + self.body
        want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        sigs = h.get("webhook-signature", "").split(" ")
        return any(hmac.compare_digest(s, f"v1,{want}") for s in sigs)


@dataclass
class HookReceiver:
    """Webhook receiver state: requests received, and answers to give first (status, headers)."""

    port: int = 0
    hooks: list[Hook] = field(default_factory=list)
    fail_first: list[tuple[int, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            headers = {}
            for line in head.split("\r\n")[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(min(int(headers.get("content-length", "0")), 1 << 20))
            self.hooks.append(Hook(headers, body))
            status, extra = self.fail_first.pop(0) if self.fail_first else (200, "")
            head_out = f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n"
            writer.write(f"{head_out}{extra}\r\n".encode())
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


@contextlib.asynccontextmanager
async def hook_receiver() -> AsyncIterator[HookReceiver]:
    """Serve HTTP on a free loopback port."""
    receiver = HookReceiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()
        await server.wait_closed()

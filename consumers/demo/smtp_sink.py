"""A real SMTP server on loopback for the demo and the tests: records mail, fails on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

__all__ = ["Received", "Sink", "smtp_sink"]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: str | None = None  # the TLS version the message came over, None when in clear

    def parsed(self) -> EmailMessage:
        msg = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Sink:
    """What the server received, and how it should answer next.

    `refuse_rcpt`: address (lower case) → reply for RCPT TO (e.g. "550 5.1.1 no such user").
    `data_replies`: replies to give at DATA, one per transaction, before accepting again.
    `users`: login → password accepted by AUTH; `logins` the credentials presented.
    """

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    logins: list[tuple[str, str]] = field(default_factory=list)

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user else ""
        return f"smtp://{auth}{self.host}:{self.port}"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, _: list[str]
    ) -> str:
        reply = self.refuse_rcpt.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        data = envelope.original_content or envelope.content
        assert isinstance(data, bytes)
        assert envelope.mail_from is not None
        tls = server.transport.get_extra_info("ssl_object") if server.transport else None
        version = None if tls is None else tls.version()
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), data, version))
        return "250 2.0.0 queued as sink"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((login, password))
            if self.users.get(login) == password:
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


@contextlib.asynccontextmanager
async def smtp_sink(
    *, starttls: ssl.SSLContext | None = None, implicit_tls: ssl.SSLContext | None = None, **kw: Any
) -> AsyncIterator[Sink]:
    """Serve SMTP on a free loopback port for the duration of the block.

    Needs `aiosmtpd`, a development dependency: without it this raises ImportError.
    `starttls`: offer STARTTLS with this context and require it before MAIL;
    `implicit_tls`: speak TLS from the first byte (smtps) with this context.
    """
    from aiosmtpd.smtp import SMTP  # imported here: the installed package runs without it

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # one line per SMTP command
    sink = Sink(**kw)
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        return SMTP(
            sink,
            hostname="sink.test",
            authenticator=sink.authenticate if sink.users else None,
            auth_require_tls=False,
            tls_context=starttls,
            require_starttls=starttls is not None,
            loop=loop,
        )

    server = await loop.create_server(protocol, sink.host, 0, ssl=implicit_tls)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()

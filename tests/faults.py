"""A loopback TCP proxy to a Redis server that loses replies on demand.

It forwards bytes both ways and reads just enough RESP of the client's side to name the
commands it sends. Armed with a `Cut`, it lets the server run a matching command, then
drops the reply and closes the client's connection as the reply arrives: the command
took effect, the client only sees its connection reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Cut", "ReplyCutter", "commands", "reply_cutter"]


def _command(buf: bytearray, pos: int) -> tuple[list[bytes], int] | None:
    """The command starting at `pos` and where the next one starts; None while incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    if buf[pos : pos + 1] != b"*":  # an inline command (redis-cli style)
        return bytes(buf[pos:end]).split(), end + 2
    count, pos, args = int(buf[pos + 1 : end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1 : end])  # `$<size>`: clients send bulk strings only
        start = end + 2
        if len(buf) < start + size + 2:
            return None
        args.append(bytes(buf[start : start + size]))
        pos = start + size + 2
    return args, pos


def commands(buf: bytearray) -> list[list[bytes]]:
    """Take the complete commands off the front of `buf` (what a client sent so far)."""
    out, pos = [], 0
    while (parsed := _command(buf, pos)) is not None:
        args, pos = parsed
        out.append(args)
    del buf[:pos]
    return out


@dataclass(eq=False)
class Cut:
    """Lose the reply to the next `times` commands named `name` (any case) that have an
    argument containing `arg` (if given), when the reply holds `reply_has` (if given:
    e.g. a stream's key, so that an empty blocking read is let through)."""

    name: bytes
    arg: bytes | None = None
    reply_has: bytes | None = None
    times: int = 1
    cut: list[list[bytes]] = field(default_factory=list)
    """The commands whose reply was lost, in order."""
    replies: list[bytes] = field(default_factory=list)
    """The replies lost (what the server sent when the client's side was reset)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once `times` replies were lost."""

    def matches(self, args: list[bytes]) -> bool:
        if not args or args[0].upper() != self.name.upper():
            return False
        return self.arg is None or any(self.arg in a for a in args[1:])


class _Link:
    """One client connection and its twin to the server."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.parsing = bytearray()
        # Sent since the server last answered: what its next chunk replies to.
        self.waiting: list[list[bytes]] = []

    def abort(self) -> None:
        """Reset both sides at once (no reply byte gets through)."""
        for writer in (self.client, self.server):
            writer.transport.abort()


class ReplyCutter:
    """The proxy: clients connect to `url`; traffic goes to `host:port` and back."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.cuts: list[Cut] = []
        self.links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        """Listen on a free loopback port (the system picks it, so no race for one)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def arm(
        self,
        name: bytes,
        *,
        arg: bytes | None = None,
        reply_has: bytes | None = None,
        times: int = 1,
    ) -> Cut:
        """Lose the replies `Cut` describes from now on; wait on `Cut.done` to know when."""
        cut = Cut(name, arg, reply_has, times)
        self.cuts.append(cut)
        return cut

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self.links.add(link)
        for coro in (self._upstream(link, reader), self._downstream(link, up_reader)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _upstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to server: forward every byte, noting the commands."""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                link.parsing += chunk
                link.waiting += commands(link.parsing)
                link.server.write(chunk)
                await link.server.drain()
        self._end(link)

    async def _downstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Server to client: forward replies, unless one answers a command a cut matches."""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                answered, link.waiting = link.waiting, []
                cut = self._cut_for(answered, chunk)
                if cut is not None:
                    link.abort()  # the command ran; its reply never reaches the client
                    break
                link.client.write(chunk)
                await link.client.drain()
        self._end(link)

    def _cut_for(self, answered: list[list[bytes]], chunk: bytes) -> Cut | None:
        for cut in self.cuts:
            if cut.done.is_set() or (cut.reply_has is not None and cut.reply_has not in chunk):
                continue
            hit = next((args for args in answered if cut.matches(args)), None)
            if hit is not None:
                cut.cut.append(hit)
                cut.replies.append(chunk)
                if len(cut.cut) >= cut.times:
                    cut.done.set()
                return cut
        return None

    def _end(self, link: _Link) -> None:
        """One side closed: close the other (a client that left, or a server that did)."""
        if link in self.links:
            self.links.discard(link)
            for writer in (link.client, link.server):
                writer.close()


@contextlib.asynccontextmanager
async def reply_cutter(host: str = "127.0.0.1", port: int = 6379) -> AsyncIterator[ReplyCutter]:
    """A started `ReplyCutter` to `host:port` for the block, closed after."""
    proxy = ReplyCutter(host, port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()

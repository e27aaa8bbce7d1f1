"""The parse pool: mail parsing in separate processes, so it never holds the event loop.

Parsing a message is CPU work that holds the interpreter lock: in the worker's own process
(even in a thread) a slow message would stop the event loop, its heartbeats and every
other queue. Here each parse runs in a child process
(`jobstream.consumers.worker.parseproc`), at most `processes` at a time (one per CPU by
default); a call waits for a free child without blocking the loop.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop a call once started, so a
job that timed out would leave its parse burning a CPU (and the slot) until it ended. The
design here is the simplest that can: each child serves one call at a time over its own
stdin/stdout pipes, and a call that is cancelled (the engine cancels a handler at its
timeout) kills its child with SIGKILL at once; the next call starts a fresh child. Children
start on demand, so a worker that parses nothing starts none.

What crosses the process boundary is small and inert: the raw bytes and the name of a
parser in, the parser's msgspec struct out (msgpack). A child killed by a signal mid-parse
(a crash, the out-of-memory killer) fails the job with a PermanentError that says so: the
same message would do it again. A child that exits by itself (it could not start) fails
the call with a RetryableError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import TypeVar

import msgspec

from jobstream.consumers.mail.dsn import ParsedBounce
from jobstream.consumers.mail.inbound import ParsedMessage
from jobstream.consumers.worker import parseproc
from jobstream.consumers.worker.parseproc import Reply, Request
from jobstream.streams import JobError, PermanentError, RetryableError

__all__ = ["ParsePool", "default_processes"]

_T = TypeVar("_T", bound=msgspec.Struct)
_HEADER_BYTES = 4
_CLOSE_WAIT_S = 5.0


def default_processes() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if counter is not None:
        return max(1, counter() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


class _Child:
    """One parser process and its pipes; one call at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, request: bytes) -> bytes:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None  # both are pipes, see ParsePool._spawn
        assert stdout is not None
        stdin.write(len(request).to_bytes(_HEADER_BYTES, "big"))
        stdin.write(request)
        await stdin.drain()
        size = int.from_bytes(await stdout.readexactly(_HEADER_BYTES), "big")
        return await stdout.readexactly(size)


class ParsePool:
    """Up to `processes` parser processes; `parse_message` and `parse_bounce` run in them.

    Create it in a running event loop's context and `aclose` it when done. A cancelled call
    kills its child (the parse stops at once) and frees its slot.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("a parse pool needs at least one process")
        self.processes = processes
        self._slots = asyncio.Semaphore(processes)
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._ending: set[asyncio.Task[int]] = set()
        self._closed = False
        self.command = [sys.executable, "-m", parseproc.__name__]  # what a child runs

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children, busy ones first."""
        return [c.proc.pid for c in (*self._busy, *self._idle)]

    @property
    def busy_pids(self) -> list[int]:
        """Process ids of the children parsing right now."""
        return [c.proc.pid for c in self._busy]

    async def parse_message(self, raw: bytes) -> ParsedMessage:
        """`jobstream.consumers.mail.inbound.parse_message(raw)`, in a child process."""
        return await self._run("inbound", raw, ParsedMessage)

    async def parse_bounce(self, raw: bytes) -> ParsedBounce:
        """`jobstream.consumers.mail.dsn.parse_bounce(raw)`, in a child process."""
        return await self._run("bounce", raw, ParsedBounce)

    async def _run(self, parser: str, raw: bytes, result_type: type[_T]) -> _T:
        request = msgspec.msgpack.encode(Request(parser, raw))
        async with self._slots:
            if self._closed:
                raise RuntimeError("the parse pool is closed")
            child = self._idle.pop() if self._idle else await self._spawn()
            self._busy.add(child)
            try:
                data = await child.call(request)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self._end(child)
                raise await self._death(child, len(raw)) from exc
            except BaseException:  # cancelled (the job's timeout) or broken: stop the parse
                self._end(child)
                raise
            self._busy.discard(child)
            self._idle.append(child)
        reply = msgspec.msgpack.decode(data, type=Reply)
        if reply.error is not None:
            raise PermanentError(f"parsing a {len(raw)}-byte message failed: {reply.error}")
        return msgspec.msgpack.decode(reply.result, type=result_type)

    async def _spawn(self) -> _Child:
        # A session of its own: a Ctrl-C at the terminal reaches the worker, which decides
        # when parsing stops, and not the children directly.
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        return _Child(proc)

    def _end(self, child: _Child) -> None:
        """Kill a child now (never reused) and reap it in the background."""
        self._busy.discard(child)
        # os.kill, not Process.kill: that polls first, and a poll that reaps a child which
        # just died robs asyncio's child watcher of its exit status.
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)
        task = asyncio.get_running_loop().create_task(child.proc.wait())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _death(self, child: _Child, size: int) -> JobError:
        """The error for a call whose child ended: permanent if a signal killed it mid-parse."""
        code = await child.proc.wait()
        if code < 0:
            what = f"died (killed by signal {-code}) while parsing a {size}-byte message"
            return PermanentError(f"the parser process {what}")
        return RetryableError(f"the parser process exited (exit code {code}) before answering")

    async def aclose(self) -> None:
        """Stop every child: idle ones by closing their input, busy ones by SIGKILL."""
        self._closed = True
        idle, self._idle = self._idle, []
        for child in list(self._busy):
            self._end(child)
        for child in idle:
            if child.proc.stdin is not None:
                child.proc.stdin.close()
        for child in idle:
            try:
                await asyncio.wait_for(child.proc.wait(), _CLOSE_WAIT_S)
            except TimeoutError:
                self._end(child)
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

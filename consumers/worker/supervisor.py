"""One worker per core: a supervisor that runs N engine processes, restarts one that dies
and drains them all on SIGTERM/SIGINT. It runs no job itself and holds no connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from jobstream.consumers.worker.health import HealthReport, read_report, write_report
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError

__all__ = [
    "EXIT_UNDRAINED",
    "ChildOptions",
    "RestartBackoff",
    "Supervisor",
    "check_bindable",
    "child_command",
    "for_slot",
    "run_processes",
    "usable_cores",
    "watch_supervisor",
]

logger = logging.getLogger(__name__)

EXIT_UNDRAINED = 3
"""A child's exit code when it stopped with entries it could not finish (left pending)."""
_EXIT_CONFIG = 2  # the CLI's exit code for bad configuration: restarting cannot help
_CLI_MODULE = "jobstream.consumers.cli"  # `python -m` it: the `jobstream` command


async def watch_supervisor(stop: Callable[[], None], parent: int) -> None:
    """In a worker process of `--processes N`: drain (`stop()`) once the supervisor that
    started it (`parent`) is gone, e.g. SIGKILLed, so that no worker outlives it unwatched.
    Waits on a process file descriptor (Linux), readable when that process has exited."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        fd = None  # gone before this process looked
    if fd is not None:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        loop.add_reader(fd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    logger.error("supervisor %d is gone: draining and exiting", parent)
    stop()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass
class RestartBackoff:
    """Exponential restart delays for one slot: base, 2 x base, ... up to the cap; a child
    that ran at least `stable_s` before it died starts the sequence again."""

    base_s: float = 0.5
    cap_s: float = 30.0
    stable_s: float = 60.0
    failures: int = 0

    def delay_s(self, ran_s: float) -> float:
        """The wait before restarting a child that died after running `ran_s` seconds."""
        if ran_s >= self.stable_s:
            self.failures = 0
        delay = min(self.cap_s, self.base_s * 2.0**self.failures)
        self.failures += 1
        return delay


def for_slot(settings: Settings, slot: int, processes: int) -> Settings:
    """A child's settings: its own stable consumer name (when one is configured), its own
    health file, and its share of the parser processes (unless configured)."""
    changes: dict[str, object] = {}
    if settings.consumer_name:
        changes["consumer_name"] = f"{settings.consumer_name}-{slot}"
    if settings.health_file:
        changes["health_file"] = f"{settings.health_file}.{slot}"
    if settings.parse_processes is None:
        changes["parse_processes"] = max(1, usable_cores() // processes)
    return msgspec.structs.replace(settings, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildOptions:
    """The `jobstream worker` options the supervisor passes on to every engine process;
    `metrics_port` is the first process's, each next one serves on the port after."""

    queues: Sequence[str] | None
    concurrency: int | None
    burst: bool
    metrics_port: int | None
    log_level: str | None
    log_format: str
    metrics_host: str | None = None


def child_command(slot: int, processes: int, options: ChildOptions) -> list[str]:
    """The command line of the engine process in `slot` (a metrics port of its own)."""
    cmd = [sys.executable, "-m", _CLI_MODULE]
    if options.log_level:
        cmd += ["--log-level", options.log_level]
    cmd += ["worker", "--processes", str(processes), "--slot", str(slot)]
    cmd += ["--supervisor", str(os.getpid())]  # the child drains once this process is gone
    cmd += ["--log-format", options.log_format]
    if options.queues:
        cmd += ["--queues", *options.queues]
    if options.concurrency is not None:
        cmd += ["--concurrency", str(options.concurrency)]
    if options.burst:
        cmd.append("--burst")
    if options.metrics_port is not None:
        cmd += ["--metrics-port", str(options.metrics_port + slot)]
    if options.metrics_host is not None:
        cmd += ["--metrics-host", options.metrics_host]
    return cmd


@dataclass
class _Child:
    slot: int
    backoff: RestartBackoff
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    last_exit: int | None = None
    restarts: int = 0
    done: bool = False  # exited for good (drained, burst finished, or given up)


@dataclass
class Supervisor:
    """Run `commands[i]` in slot i until stopped; keep every slot filled until then."""

    commands: list[list[str]]
    grace_s: float
    burst: bool = False
    health_file: str | None = None
    health_every_s: float = 3.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    children: list[_Child] = field(default_factory=list)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or, in burst mode, until every child finished); return
        0 when every child drained, 2 on a configuration error, 1 otherwise."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        b = self.backoff
        self.children = [
            _Child(i, RestartBackoff(b.base_s, b.cap_s, b.stable_s))
            for i in range(len(self.commands))
        ]
        logger.info("supervisor %d started: %d worker processes", os.getpid(), len(self.children))
        reporter = asyncio.create_task(self._report()) if self.health_file else None
        try:
            results = await asyncio.gather(*(self._keep(c) for c in self.children))
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if _EXIT_CONFIG in results:
            return _EXIT_CONFIG
        failed = [c.slot for c, rc in zip(self.children, results, strict=True) if rc != 0]
        if failed:
            logger.error("worker processes %s did not drain cleanly", failed)
            return 1
        logger.info("supervisor %d stopped: every worker process drained", os.getpid())
        return 0

    def stop(self) -> None:
        """Forward SIGTERM to every child; none is restarted from now on."""
        if self.stopping.is_set():
            return
        logger.info("stopping: draining %d worker processes", len(self.children))
        self.stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)

    async def _keep(self, child: _Child) -> int:
        """Run one slot's child, restarting it until stopped; return its last exit code."""
        while True:
            child.proc = await asyncio.create_subprocess_exec(*self.commands[child.slot])
            child.started_at = time.monotonic()
            if self.stopping.is_set():  # stopped while it was starting
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            rc = await self._wait(child)
            child.last_exit = rc
            ran_s = time.monotonic() - child.started_at
            if self.stopping.is_set() or (self.burst and rc == 0):
                child.done = True
                if self.stopping.is_set() and rc == -signal.SIGTERM:
                    # Our SIGTERM reached it before it had set its handler, i.e. while it
                    # was starting: it had read nothing, so it left nothing behind.
                    logger.info("worker process %d stopped while starting", child.slot)
                    return 0
                return rc
            if rc == _EXIT_CONFIG:  # bad configuration: every restart would fail the same way
                logger.error("worker process %d: configuration error; stopping all", child.slot)
                child.done = True
                self.stop()
                return rc
            delay = child.backoff.delay_s(ran_s)
            child.restarts += 1
            logger.error(
                "worker process %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                child.slot, child.proc.pid, _describe(rc), ran_s, delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                child.done = True
                return rc if rc != 0 else 1

    async def _wait(self, child: _Child) -> int:
        """The child's exit code; once stopping, SIGKILL it if it outlives the grace period."""
        assert child.proc is not None
        waiting = asyncio.ensure_future(child.proc.wait())
        stopped = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not waiting.done():  # stopping: the child drains within its grace period
            done, _ = await asyncio.wait([waiting], timeout=self.grace_s + 15)
            if not done:
                logger.error("worker process %d (pid %d) did not exit after the grace period: "
                             "killed", child.slot, child.proc.pid)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await waiting
                return 1
        return waiting.result()

    async def _report(self) -> None:
        """Keep the supervisor's health file current: healthy only while every child is."""
        assert self.health_file is not None
        target = pathlib.Path(self.health_file)
        try:
            while True:
                report = self._health()
                await asyncio.to_thread(write_report, target, report)
                await asyncio.sleep(self.health_every_s)
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(target.unlink)

    def _health(self) -> HealthReport:
        problems, consumer = [], ""
        for child in self.children:
            if child.done:
                continue
            if child.proc is None and child.last_exit is None:
                problems.append(f"worker process {child.slot} starting")
                continue
            running = child.proc is not None and child.proc.returncode is None
            if not running:
                problems.append(f"worker process {child.slot} restarting "
                                f"(exited with {_describe(child.last_exit)})")  # fmt: skip
                continue
            path = f"{self.health_file}.{child.slot}"
            report, problem = read_report(path, 6 * self.health_every_s)
            if problem is not None and time.monotonic() - child.started_at > 30:
                problems.append(f"worker process {child.slot}: {problem}")
            elif report is not None and not consumer:
                consumer = report.consumer  # `jobstream health` checks its heartbeat too
        if not consumer and not problems:
            problems.append("starting: no worker process has reported yet")
        return HealthReport(consumer, os.getpid(), time.time(), "; ".join(problems) or None)


def _describe(rc: int | None) -> str:
    if rc is None:
        return "nothing yet"
    if rc < 0:
        return f"signal {signal.Signals(-rc).name}"
    return f"code {rc}"


def check_bindable(host: str, port: int) -> None:
    """Raise ConfigError naming `host:port` when a metrics server could not listen there."""
    where = f"cannot serve metrics on {host}:{port}"
    if port > 65535:
        raise ConfigError(f"{where}: past 65535 (one port a process, from --metrics-port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(address)
    except OSError as exc:  # in use, not ours to bind, or a host that does not resolve
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None


async def run_processes(settings: Settings, processes: int, options: ChildOptions) -> int:
    """`jobstream worker --processes N` with N > 1: supervise N engine processes.

    Each process serves `/metrics` on a port of its own, from the given one (or the
    settings') up; one that cannot be bound fails the command here, in one line.
    """
    if options.metrics_port is None:
        options = dataclasses.replace(options, metrics_port=settings.metrics_port)
    if options.metrics_port is not None:
        host = options.metrics_host or settings.metrics_host
        for slot in range(processes):
            check_bindable(host, options.metrics_port + slot)
    commands = [child_command(slot, processes, options) for slot in range(processes)]
    supervisor = Supervisor(
        commands,
        grace_s=settings.shutdown_grace_s,
        burst=options.burst,
        health_file=settings.health_file,
        health_every_s=settings.alive_ttl_ms / 3000,
    )
    return await supervisor.run()

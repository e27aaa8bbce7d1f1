"""The parse pool: the same results as parsing in process, bounded size, cancelled parses killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from bench.adversarial import CRAFTED
from jobstream.consumers.mail.dsn import BouncedRecipient, ParsedBounce, parse_bounce
from jobstream.consumers.mail.inbound import parse_message
from jobstream.consumers.worker import parseproc
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.parsepool import ParsePool, default_processes
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import ConfigError, PermanentError, RetryableError
from tests.helpers import alive, eventually

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[1] / "data"
PATHS = [
    DATA / "inbound" / "rfc2047_malformed.eml",
    DATA / "inbound" / "reply_in_reply_to.eml",
    DATA / "bounces" / "messages" / "postfix_01.txt",
    DATA / "bounces_extra" / "messages" / "office365_01.eml",
]
SAMPLES = [p.read_bytes() for p in PATHS]
# Tens of thousands of parts: seconds of parsing, long enough to be caught mid-parse.
SLOW = CRAFTED["sibling_parts"](40)


@pytest.fixture
async def pool() -> AsyncIterator[ParsePool]:
    p = ParsePool(2)
    try:
        yield p
    finally:
        await p.aclose()


async def until_gone(pid: int) -> None:
    async def check() -> bool:
        return not alive(pid)

    await eventually(check, timeout_s=5)


async def busy_pid(pool: ParsePool) -> int:
    async def check() -> list[int]:
        return pool.busy_pids

    pids: list[int] = await eventually(check, timeout_s=30)
    (pid,) = pids
    return pid


@pytest.mark.parametrize("raw", SAMPLES, ids=[p.name for p in PATHS])
async def test_results_are_those_of_the_parsers(pool: ParsePool, raw: bytes) -> None:
    assert await pool.parse_message(raw) == parse_message(raw)
    assert await pool.parse_bounce(raw) == parse_bounce(raw)


async def test_a_cancelled_parse_kills_its_process(pool: ParsePool) -> None:
    task = asyncio.create_task(pool.parse_message(SLOW))
    pid = await busy_pid(pool)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_gone(pid)
    assert pid not in pool.pids
    raw = SAMPLES[0]
    assert await pool.parse_message(raw) == parse_message(raw)  # a fresh process
    assert pid not in pool.pids


async def test_a_parse_under_a_timeout_stops_with_it(pool: ParsePool) -> None:
    task = asyncio.create_task(asyncio.wait_for(pool.parse_bounce(SLOW), 0.5))
    pid = await busy_pid(pool)
    with pytest.raises(TimeoutError):
        await task
    await until_gone(pid)
    assert pool.busy_pids == []


async def test_a_crashed_process_fails_the_call_for_good(pool: ParsePool) -> None:
    task = asyncio.create_task(pool.parse_message(SLOW))
    os.kill(await busy_pid(pool), signal.SIGKILL)
    with pytest.raises(PermanentError, match=r"parser process died \(killed by signal 9\)"):
        await task
    raw = SAMPLES[1]
    assert await pool.parse_message(raw) == parse_message(raw)


async def test_a_process_that_cannot_start_fails_the_call_for_now(pool: ParsePool) -> None:
    pool.command = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(RetryableError, match=r"exited \(exit code 3\) before answering"):
        await pool.parse_message(SAMPLES[0])
    assert pool.pids == []


async def test_a_parse_never_outlives_its_worker() -> None:
    """The worker is SIGKILLed mid-parse: its parser process notices and exits."""
    script = (
        "import asyncio, sys\n"
        "from bench.adversarial import CRAFTED\n"
        "from jobstream.consumers.worker.parsepool import ParsePool\n"
        "async def main():\n"
        "    pool = ParsePool(1)\n"
        "    task = asyncio.create_task(pool.parse_message(CRAFTED['sibling_parts'](200)))\n"
        "    while not pool.busy_pids:\n"
        "        await asyncio.sleep(0.01)\n"
        "    await asyncio.sleep(1)  # the whole message is in the child: it is parsing\n"
        "    print(pool.busy_pids[0], flush=True)\n"
        "    await task\n"
        "asyncio.run(main())\n"
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert worker.stdout is not None
    try:
        pid = int(await asyncio.wait_for(worker.stdout.readline(), 30))
        assert alive(pid)
    finally:
        worker.kill()
        await worker.wait()
    await until_gone(pid)


async def test_calls_beyond_its_size_wait_for_a_process() -> None:
    pool = ParsePool(1)
    seen: set[int] = set()

    async def watch() -> None:
        while True:
            seen.update(pool.pids)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        raws = SAMPLES
        results = await asyncio.gather(*(pool.parse_message(raw) for raw in raws))
        assert results == [parse_message(raw) for raw in raws]
        assert len(seen) == 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await pool.aclose()


async def test_closing_stops_every_process() -> None:
    pool = ParsePool(2)
    raw = SAMPLES[0]
    await asyncio.gather(pool.parse_message(raw), pool.parse_bounce(raw))
    pids = pool.pids
    assert len(pids) == 2
    assert all(map(alive, pids))
    await pool.aclose()
    assert not any(map(alive, pids))
    with pytest.raises(RuntimeError, match="closed"):
        await pool.parse_message(raw)


def test_a_failing_parser_answers_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes) -> ParsedBounce:
        raise ValueError("no\nway")

    monkeypatch.setitem(parseproc.PARSERS, "broken", broken)
    reply = msgspec.msgpack.decode(
        parseproc.answer(msgspec.msgpack.encode(parseproc.Request("broken", b"x"))),
        type=parseproc.Reply,
    )
    assert reply.error == "ValueError: no"
    unknown = parseproc.answer(msgspec.msgpack.encode(parseproc.Request("nope", b"x")))
    assert msgspec.msgpack.decode(unknown, type=parseproc.Reply).error == "KeyError: 'nope'"


def test_raw_bytes_in_results_cross_as_replacement_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def echo(raw: bytes) -> ParsedBounce:
        text = raw.decode("utf-8", "surrogateescape")
        recipient = BouncedRecipient(
            address="a@example.com", kind="hard", status=None, diagnostic=text, action=None,
            remote_mta=None,
        )  # fmt: skip
        return ParsedBounce(is_bounce=True, recipients=[recipient], original_message_id=None)

    monkeypatch.setitem(parseproc.PARSERS, "echo", echo)
    data = parseproc.answer(msgspec.msgpack.encode(parseproc.Request("echo", b"550 \xff!")))
    reply = msgspec.msgpack.decode(data, type=parseproc.Reply)
    parsed = msgspec.msgpack.decode(reply.result, type=ParsedBounce)
    assert parsed.recipients[0].diagnostic == "550 \ufffd!"


def test_default_size_is_the_cpus_available() -> None:
    assert 1 <= default_processes() <= (os.cpu_count() or 1)
    assert default_processes() == len(os.sched_getaffinity(0))


def test_size_is_configurable() -> None:
    assert Settings.from_env({"JOBSTREAM_PARSE_PROCESSES": "3"}).parse_processes == 3
    assert Settings.from_env({}).parse_processes is None
    with pytest.raises(ConfigError, match="JOBSTREAM_PARSE_PROCESSES"):
        Settings.from_env({"JOBSTREAM_PARSE_PROCESSES": "0"})


async def test_each_worker_has_a_pool_of_the_configured_size(deps: Deps) -> None:
    assert deps.parser.processes == (deps.settings.parse_processes or default_processes())
    assert deps.parser.pids == []  # nothing parsed yet: nothing started

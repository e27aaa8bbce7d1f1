"""Latency: publish-to-start at a steady rate, the engine beside a bare redis-py loop.

    python -m bench.latency --rate 500 --jobs 10000

Publishes `--jobs` entries at `--rate` a second (each carries its publish time), first to a
worker process running the engine (full path: status rows, hash, ack), then to a bare
redis-py consumer loop in its own process (XREADGROUP + XACK, nothing else), and prints
p50, p90, p99 and max of the time from publish to the handler's start (the bare loop:
to the entry's arrival) for both, and the ratio of the p99s. Exits non-zero when a side
started fewer jobs than were published.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/latency.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bench import common
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import handler
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.streams import Job, Keys, Policy

SCRIPT = Path(__file__).resolve()
QUEUE = "bench-latency"
GROUP = "workers"


class Ping(msgspec.Struct, frozen=True):
    """Payload of the latency queue: when it was published (seconds since the epoch)."""

    sent_at: float
    n: int


_seen: list[float] = []


@handler(QUEUE, Ping, Policy(concurrency=64, timeout_s=30))
async def ping(payload: Ping, job: Job, deps: Deps) -> None:
    """Note how long the job waited from its publish to this start."""
    _seen.append(time.time() - payload.sent_at)


async def engine_worker(db: str, prefix: str, n: int) -> None:
    """The engine side, in its own process: run until N jobs started, print the waits."""
    settings = common.bench_settings(db, prefix, block_ms=1000)
    async with connect(settings) as deps:
        engine = make_engine(deps, None, None, handlers=[ping])
        run = asyncio.create_task(engine.run())
        await asyncio.sleep(0.5)  # set up: the group exists before anything is published
        print("ready", flush=True)
        deadline = None
        while len(_seen) < n and not run.done():
            await asyncio.sleep(0.05)
            if deadline is None and _seen:
                deadline = time.monotonic() + n / 50 + 60
            if deadline is not None and time.monotonic() > deadline:
                break
        engine.stop()
        await run
    print(json.dumps(_seen), flush=True)


def _bare_stream(prefix: str) -> str:
    """The bare loop's stream: apart from the engine's, under the same run prefix."""
    return Keys(f"{prefix}bare:", f"{prefix}bjob:").stream(QUEUE)


async def bare_worker(prefix: str, n: int) -> None:
    """A bare redis-py consumer: read, note the wait, ack; nothing else."""
    r = aioredis.Redis.from_url(common.REDIS_URL)
    stream = _bare_stream(prefix)
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    decode = msgspec.json.Decoder(Ping).decode
    seen: list[float] = []
    print("ready", flush=True)
    idle_since = time.monotonic()
    while len(seen) < n and time.monotonic() - idle_since < 30:
        reply: Any = await r.xreadgroup(GROUP, "bare", {stream: ">"}, count=100, block=1000)
        if not reply:
            continue
        idle_since = time.monotonic()
        entries = reply[0][1]
        now = time.time()
        for _, fields in entries:
            seen.append(now - decode(fields[b"payload"]).sent_at)
        await r.xack(stream, GROUP, *[eid for eid, _ in entries])
    await r.aclose()
    print(json.dumps(seen), flush=True)


async def publish_steadily(stream: str, n: int, rate: float) -> float:
    """XADD one entry every 1/rate seconds on a fixed schedule; return the rate achieved."""
    r = aioredis.Redis.from_url(common.REDIS_URL)
    encode = msgspec.json.encode
    started = time.monotonic()
    for i in range(n):
        due = started + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        payload = encode(Ping(sent_at=time.time(), n=i))
        await r.xadd(stream, {"id": f"lat-{i}", "payload": payload})
    achieved = n / (time.monotonic() - started)
    await r.aclose()
    return achieved


async def side(args: list[str], stream: str, n: int, rate: float) -> tuple[list[float], float]:
    """Start one side's process, publish to it, and collect its waits (seconds)."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--worker", *args, env=common.worker_env(), stdout=pipe
    )
    try:
        assert proc.stdout is not None
        if (await asyncio.wait_for(proc.stdout.readline(), 120)).strip() != b"ready":
            raise common.BenchError("a latency worker failed to start")
        achieved = await publish_steadily(stream, n, rate)
        out, _ = await asyncio.wait_for(proc.communicate(), n / rate + 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise common.BenchError("a latency worker failed")
    return json.loads(out.decode().strip().splitlines()[-1]), achieved


def summary(waits: list[float]) -> dict[str, float]:
    ms = sorted(w * 1000 for w in waits)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": ms[-1]}


async def one_run(n: int, rate: float) -> dict[str, tuple[dict[str, float], float]]:
    """The engine, then the bare loop, each fed N jobs at `rate`: their summaries."""
    async with common.scratch_prefix("l") as prefix:
        async with common.scratch_database() as db:
            stream = common.bench_keys(prefix).stream(QUEUE)
            engine_waits, engine_rate = await side(
                ["--side", "engine", "--db", db, "--prefix", prefix, "--jobs", str(n)],
                stream, n, rate,
            )  # fmt: skip
        common.require_drained("engine", n, len(engine_waits))
        bare_stream = _bare_stream(prefix)
        bare_waits, bare_rate = await side(
            ["--side", "bare", "--prefix", prefix, "--jobs", str(n)], bare_stream, n, rate
        )
        common.require_drained("bare loop", n, len(bare_waits))
    return {
        "engine (full path)": (summary(engine_waits), engine_rate),
        "bare redis-py loop": (summary(bare_waits), bare_rate),
    }


async def main(n: int, rate: float, repeat: int) -> None:
    await common.check_servers()
    runs = [await one_run(n, rate) for _ in range(repeat)]
    print(f"publish-to-start latency, {n} jobs at {rate:,.0f}/s, each side in its own "
          f"process, median of {repeat} interleaved runs; {common.load_note()}")  # fmt: skip
    p99s: dict[str, float] = {}
    for name in runs[0]:
        s = {k: statistics.median(r[name][0][k] for r in runs) for k in runs[0][name][0]}
        achieved = min(r[name][1] for r in runs)
        each = ", ".join(f"{r[name][0]['p99']:.2f}" for r in runs)
        print(f"{name:<20} p50 {s['p50']:6.2f} ms  p90 {s['p90']:6.2f} ms  "
              f"p99 {s['p99']:6.2f} ms  max {s['max']:7.2f} ms  (p99 of each run: {each}; "
              f"published at >= {achieved:,.0f}/s)")  # fmt: skip
        p99s[name] = s["p99"]
    ratio = p99s["engine (full path)"] / p99s["bare redis-py loop"]
    print(f"ratio of p99s engine / bare loop: {ratio:.2f}")


if __name__ == "__main__":
    ap = common.bench_parser(__doc__)
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs published to each side")
    ap.add_argument("--rate", type=float, default=500.0, help="jobs published a second")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of both sides")
    ap.add_argument("--side", choices=("engine", "bare"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker and a.side == "engine":
        common.run_main(lambda: engine_worker(a.db, a.prefix, a.jobs))
    elif a.worker:
        common.run_main(lambda: bare_worker(a.prefix, a.jobs))
    else:
        common.run_main(lambda: main(a.jobs, a.rate, a.repeat))

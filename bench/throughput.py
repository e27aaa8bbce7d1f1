"""Throughput: the engine's full path (PostgreSQL + hash + ack) against a plain redis-py loop.

    python -m bench.throughput --n 20000 --concurrency 64

Publishes N no-op jobs, drains them with one worker process, then drains the same N with
a bare loop doing the same writes (XREADGROUP COUNT 500, one unnest upsert per batch,
pipelined HSET, one XACK), and prints jobs/s of both and their ratio, from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from bench.common import NOOP, NOOP_QUEUE, REDIS_URL, Noop, drop_keys, scratch_database
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.consumers.worker.settings import Settings
from jobstream.otel.tracing import setup_tracing
from jobstream.streams import Keys, Publisher

PLAIN_UPSERT_SQL = """
INSERT INTO jobs AS j (id, queue, status, payload, result, attempts, stream_entry_id,
                       created_at, started_at, completed_at, updated_at)
SELECT u.id, $2, 'completed', u.payload::jsonb, NULL, 1, u.entry_id, now(), now(), now(), now()
FROM unnest($1::text[], $3::text[], $4::text[]) AS u(id, payload, entry_id)
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
"""


async def publish(redis: aioredis.Redis, keys: Keys, n: int) -> float:
    pub = Publisher(redis, keys, {NOOP_QUEUE: Noop}, record_queued=False)
    started = time.perf_counter()
    for i in range(0, n, 1000):
        await pub.publish_many(NOOP_QUEUE, [Noop(n=j) for j in range(i, min(i + 1000, n))])
    return time.perf_counter() - started


class _Clock:
    """Observer that notes when the N-th job settled."""

    def __init__(self, n: int) -> None:
        self.n, self.done, self.first, self.last = n, 0, 0.0, 0.0

    def job_started(self, queue: str) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def job_finished(self, queue: str, outcome: str, duration_s: float) -> None:
        self.done += 1
        if self.done >= self.n:
            self.last = time.perf_counter()

    def queue_stats(self, queue: str, pending: int, lag: int, dead: int) -> None:
        return None

    def dead_letters_dropped(self, queue: str, cap: str, count: int) -> None:
        return None


async def worker(db: str, prefix: str, n: int, concurrency: int) -> None:
    """The engine side, run in its own process: drain N jobs, print JSON figures."""
    settings = Settings(
        database_url=db,
        stream_prefix=f"{prefix}jobs:",
        job_prefix=f"{prefix}job:",
        block_ms=20,
        log_level="WARNING",
    )
    clock = _Clock(n)
    tracing = setup_tracing("bench", "bench-worker")  # only when OTEL_* says so
    async with connect(settings) as deps:
        engine = make_engine(deps, None, concurrency, burst=True, handlers=[NOOP])
        engine.observer = clock
        started = time.perf_counter()
        await engine.run()
        drained = time.perf_counter()
        tracing.shutdown(30)  # exporting what was sampled is part of the cost
        ended = time.perf_counter()
    # From the first job's start until every outcome is committed and acked (run() returns
    # after the final flush); the burst-mode idle check adds at most a few ms.
    first = clock.first or started
    figures = {"jobs": engine.recorder.settled, "seconds": ended - first, "flush": ended - drained}
    print(json.dumps(figures))


async def plain_loop(db: str, prefix: str, n: int) -> tuple[int, float]:
    """The same work with no engine around it."""
    redis = aioredis.Redis.from_url(REDIS_URL)
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    keys = Keys(f"{prefix}plain:", f"{prefix}pjob:")
    stream = keys.stream(NOOP_QUEUE)
    await redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await publish(redis, keys, n)
    done = 0
    decode = msgspec.json.Decoder(Noop).decode
    started = time.perf_counter()
    while done < n:
        reply: Any = await redis.xreadgroup("workers", "plain", {stream: ">"}, count=500, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        ids, payloads, eids = [], [], []
        for eid, fields in entries:
            decode(fields[b"payload"])
            ids.append(fields[b"id"].decode())
            payloads.append(fields[b"payload"].decode())
            eids.append(eid.decode())
        await pool.execute(PLAIN_UPSERT_SQL, ids, NOOP_QUEUE, payloads, eids)
        pipe = redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hset(keys.job(job_id), mapping={"status": "completed", "queue": NOOP_QUEUE})
        pipe.xack(stream, "workers", *eids)
        await pipe.execute()
        done += len(entries)
    seconds = time.perf_counter() - started
    await pool.close()
    await redis.aclose()
    return done, seconds


async def engine_run(db: str, prefix: str, n: int, concurrency: int, env: dict[str, str]) -> Any:
    redis = aioredis.Redis.from_url(REDIS_URL)
    await publish(redis, Keys(f"{prefix}jobs:", f"{prefix}job:"), n)
    await redis.aclose()
    cmd = [sys.executable, "-m", "bench.throughput", "--worker", "--db", db, "--prefix", prefix,
           "--n", str(n), "--concurrency", str(concurrency)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)  # noqa: ASYNC221
    # (the benchmark does nothing else meanwhile)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sink(port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.otlp_sink", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "OTLP/HTTP sink on ...": it is listening
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def traced_runs(
    db: str, n: int, concurrency: int, env: dict[str, str], repeat: int = 3
) -> None:
    """Tracing off, on with every job sampled, and on at a 10 % ratio, each exporting by
    OTLP/HTTP to a local receiver in its own process."""
    port = _free_port()
    sink = _sink(port)
    otlp = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "jobstream-bench",
    }
    runs = {
        "tracing off": env,
        "tracing on, all jobs sampled": {**env, **otlp, "OTEL_TRACES_SAMPLER": "always_on"},
        "tracing on, 10% sampled": {
            **env, **otlp, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    }  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in runs}
    try:
        # Interleaved repetitions: the tables grow as runs go, so no setting always runs first.
        for _ in range(repeat):
            for name, run_env in runs.items():
                prefix = f"b{uuid.uuid4().hex[:8]}:"
                try:
                    got = await engine_run(db, prefix, n, concurrency, run_env)
                finally:
                    await drop_keys(prefix)
                samples[name].append(got["jobs"] / got["seconds"])
    finally:
        sink.send_signal(signal.SIGTERM)
        out, _ = sink.communicate(timeout=30)
    rates = {name: statistics.median(values) for name, values in samples.items()}
    off = rates["tracing off"]
    print(f"median of {repeat} interleaved runs each, final span flush included:")
    for name, rate in rates.items():
        spread = ", ".join(f"{v:,.0f}" for v in samples[name])
        print(f"{name:<30} {rate:>9,.0f} jobs/s   ratio to tracing off: {rate / off:.2f}"
              f"   (runs: {spread})")  # fmt: skip
    print(f"receiver: {out.strip().splitlines()[-1]}")


async def main(n: int, concurrency: int, tracing: bool, repeat: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    engine_rates: list[float] = []
    plain_rates: list[float] = []
    async with scratch_database() as db:
        # Interleaved repetitions: the tables grow as runs go, so neither side always runs
        # first on a cold database.
        for _ in range(repeat):
            prefix = f"b{uuid.uuid4().hex[:8]}:"
            try:
                eng = await engine_run(db, prefix, n, concurrency, env)
                plain_n, plain_s = await plain_loop(db, prefix, n)
            finally:
                await drop_keys(prefix)
            engine_rates.append(eng["jobs"] / eng["seconds"])
            plain_rates.append(plain_n / plain_s)
        eng_rate = statistics.median(engine_rates)
        plain_rate = statistics.median(plain_rates)
        print(f"N={n} concurrency={concurrency}, median of {repeat} interleaved runs each")
        print(f"engine (full path, 1 worker process): {eng_rate:>9,.0f} jobs/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in engine_rates)})")  # fmt: skip
        print(f"plain redis-py loop (same writes):    {plain_rate:>9,.0f} jobs/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in plain_rates)})")  # fmt: skip
        print(f"ratio engine / plain loop: {eng_rate / plain_rate:.2f}")
        if tracing:
            print()
            await traced_runs(db, n, concurrency, env, repeat)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tracing", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per setting")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        asyncio.run(worker(a.db, a.prefix, a.n, a.concurrency))
    else:
        asyncio.run(main(a.n, a.concurrency, a.tracing, a.repeat))

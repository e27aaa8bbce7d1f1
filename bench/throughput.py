"""Throughput: the engine's full path (PostgreSQL + hash + ack) against a plain redis-py loop.

    python -m bench.throughput --n 20000 --concurrency 64 [--processes 2] [--tracing]

Publishes N no-op jobs, drains them with one worker process, then drains the same N with
a bare loop doing the same writes (XREADGROUP COUNT 500, one unnest upsert per batch,
pipelined HSET, one XACK), and prints jobs/s of both and their ratio, from one run.
With `--processes P` it also drains N jobs with P worker processes started together
(what `jobstream worker --processes P` runs), interleaved with the one-process runs, and
prints the ratio. Exits non-zero when any run drained fewer jobs than it published.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/throughput.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os
import signal
import statistics
import subprocess
import time
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from bench import common
from jobstream.otel.tracing import setup_tracing
from jobstream.streams import Keys, Publisher

SCRIPT = Path(__file__).resolve()
PLAIN_UPSERT_SQL = """
INSERT INTO jobs AS j (id, queue, status, payload, result, attempts, stream_entry_id,
                       created_at, started_at, completed_at, updated_at)
SELECT u.id, $2, 'completed', u.payload::jsonb, NULL, 1, u.entry_id, now(), now(), now(), now()
FROM unnest($1::text[], $3::text[], $4::text[]) AS u(id, payload, entry_id)
ON CONFLICT (id, created_at) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
"""


async def publish(redis: aioredis.Redis, keys: Keys, n: int) -> float:
    pub = Publisher(redis, keys, {common.NOOP_QUEUE: common.Noop}, record_queued=False)
    started = time.perf_counter()
    for i in range(0, n, 1000):
        await pub.publish_many(
            common.NOOP_QUEUE, [common.Noop(n=j) for j in range(i, min(i + 1000, n))]
        )
    return time.perf_counter() - started


async def worker(db: str, prefix: str, concurrency: int) -> None:
    """The engine side, run in its own process: drain the queue, print JSON figures."""
    tracing = setup_tracing("bench", "bench-worker")  # only when OTEL_* says so
    settings = common.bench_settings(db, prefix)
    # Exporting what was sampled is part of the cost.
    await common.burst_worker(
        settings, None, [common.NOOP], concurrency, after=lambda: tracing.shutdown(30)
    )


async def plain_loop(db: str, prefix: str, n: int) -> tuple[int, float]:
    """The same work with no engine around it."""
    redis = aioredis.Redis.from_url(common.REDIS_URL)
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    keys = Keys(f"{prefix}plain:", f"{prefix}pjob:")
    stream = keys.stream(common.NOOP_QUEUE)
    await redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await publish(redis, keys, n)
    done = 0
    decode = msgspec.json.Decoder(common.Noop).decode
    started = idle_since = time.perf_counter()
    while done < n and time.perf_counter() - idle_since < 30:
        reply: Any = await redis.xreadgroup("workers", "plain", {stream: ">"}, count=500, block=100)
        if not reply:
            continue
        idle_since = time.perf_counter()
        entries = reply[0][1]
        ids, payloads, eids = [], [], []
        for eid, fields in entries:
            decode(fields[b"payload"])
            ids.append(fields[b"id"].decode())
            payloads.append(fields[b"payload"].decode())
            eids.append(eid.decode())
        await pool.execute(PLAIN_UPSERT_SQL, ids, common.NOOP_QUEUE, payloads, eids)
        pipe = redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hset(keys.job(job_id), mapping={"status": "completed", "queue": common.NOOP_QUEUE})
        pipe.xack(stream, "workers", *eids)
        await pipe.execute()
        done += len(entries)
    seconds = time.perf_counter() - started
    await pool.close()
    await redis.aclose()
    return done, seconds


async def engine_run(
    db: str, prefix: str, n: int, concurrency: int, env: dict[str, str], processes: int = 1
) -> dict[str, float]:
    """Publish N jobs, drain them with `processes` worker processes started together."""
    redis = aioredis.Redis.from_url(common.REDIS_URL)
    await publish(redis, common.bench_keys(prefix), n)
    await redis.aclose()
    args = ["--db", db, "--prefix", prefix, "--concurrency", str(concurrency)]
    got = await common.run_workers(SCRIPT, args, processes, env)
    common.require_drained(f"engine, {processes} process(es)", n, int(got["jobs"]))
    return got


def _sink(port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(SCRIPT.with_name("otlp_sink.py")), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=common.worker_env())
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
                async with common.scratch_prefix("b") as prefix:
                    got = await engine_run(db, prefix, n, concurrency, run_env)
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


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _cores(runs: list[dict[str, float]]) -> str:
    """Cores busy while the engine drained (medians): its processes, Redis, the machine."""

    def med(key: str, per: str) -> float:
        return statistics.median(r[key] / r[per] for r in runs)

    return (f"cores busy: engine {med('cpu', 'seconds'):.2f}, redis-server "
            f"{med('redis_cpu', 'wall'):.2f}, whole machine {med('busy', 'wall'):.2f} of "
            f"{os.cpu_count()} (PostgreSQL and other tenants included)")  # fmt: skip


async def main(n: int, concurrency: int, tracing: bool, repeat: int, processes: int) -> None:
    await common.check_servers()
    env = common.worker_env()
    rates: dict[str, list[float]] = {"engine": [], "plain": [], "many": []}
    figures: dict[str, list[dict[str, float]]] = {"engine": [], "many": []}
    async with common.scratch_database() as db:
        # Interleaved repetitions: the tables grow as runs go, so neither side always runs
        # first on a cold database.
        for _ in range(repeat):
            async with common.scratch_prefix("b") as prefix:
                eng = await engine_run(db, prefix, n, concurrency, env)
                plain_n, plain_s = await plain_loop(db, prefix, n)
                common.require_drained("plain loop", n, plain_n)
                if processes > 1:
                    many_prefix = f"{prefix}m:"
                    many = await engine_run(db, many_prefix, n, concurrency, env, processes)
                    rates["many"].append(many["jobs"] / many["seconds"])
                    figures["many"].append(many)
            rates["engine"].append(eng["jobs"] / eng["seconds"])
            figures["engine"].append(eng)
            rates["plain"].append(plain_n / plain_s)
        eng_rate = statistics.median(rates["engine"])
        plain_rate = statistics.median(rates["plain"])
        print(f"N={n} concurrency={concurrency}, median of {repeat} interleaved runs each; "
              f"{common.load_note()}")  # fmt: skip
        print(f"engine (full path, 1 worker process): {eng_rate:>9,.0f} jobs/s "
              f"(runs: {_runs(rates['engine'])})")  # fmt: skip
        print(f"plain redis-py loop (same writes):    {plain_rate:>9,.0f} jobs/s "
              f"(runs: {_runs(rates['plain'])})")  # fmt: skip
        print(f"ratio engine / plain loop: {eng_rate / plain_rate:.2f}")
        print(f"  1 process, {_cores(figures['engine'])}")
        if processes > 1:
            many_rate = statistics.median(rates["many"])
            print(f"engine, {processes} worker processes:      {many_rate:>9,.0f} jobs/s "
                  f"(runs: {_runs(rates['many'])})")  # fmt: skip
            print(f"ratio {processes} processes / 1 process: {many_rate / eng_rate:.2f}")
            print(f"  {processes} processes, {_cores(figures['many'])}")
        if tracing:
            print()
            await traced_runs(db, n, concurrency, env, repeat)


if __name__ == "__main__":
    ap = common.bench_parser(__doc__)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--processes", type=int, default=1, help="also run this many processes")
    ap.add_argument("--tracing", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per setting")
    a = ap.parse_args()
    if a.worker:
        common.run_main(lambda: worker(a.db, a.prefix, a.concurrency))
    else:
        common.run_main(lambda: main(a.n, a.concurrency, a.tracing, a.repeat, a.processes))

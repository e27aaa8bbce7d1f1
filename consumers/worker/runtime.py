"""The worker process: connect, build the routes, run the engine, stop cleanly on signals."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec
from jobstream.consumers.worker.health import write_reports
from jobstream.consumers.worker.parsepool import ParsePool, default_processes
from jobstream.consumers.worker.registry import HANDLERS, by_queue, payloads_of, select
from jobstream.consumers.worker.settings import Settings, redact_url
from jobstream.consumers.worker.supervisor import EXIT_UNDRAINED, watch_supervisor
from jobstream.consumers.worker.tls import client_context, database_dsn, redis_tls_options
from jobstream.otel.metrics import MetricsError, MetricsHandle, setup_metrics
from jobstream.otel.redact import remember_secrets
from jobstream.otel.suppress import suppressed
from jobstream.otel.tracing import TracingHandle, setup_tracing
from jobstream.streams import (
    ConfigError,
    Engine,
    Keys,
    Observer,
    PartitionPolicy,
    Policy,
    Publisher,
)
from jobstream.streams.loop import loop_name
from jobstream.streams.redis_client import connect_redis
from jobstream.streams.scheduler import Scheduler

__all__ = [
    "check_selection",
    "connect",
    "consumer_name",
    "keys_of",
    "make_engine",
    "partition_policy",
    "partitions_of",
    "run_worker",
    "service_version",
    "start_telemetry",
]

logger = logging.getLogger(__name__)


def consumer_name(settings: Settings) -> str:
    """`<hostname>-<pid>-<random>`, unless configured (a stable name resumes its own entries)."""
    if settings.consumer_name:
        return settings.consumer_name
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def keys_of(settings: Settings) -> Keys:
    return Keys(settings.stream_prefix, settings.job_prefix)


async def _pool(settings: Settings, wait: bool, name: str | None = None) -> asyncpg.Pool:
    """The PostgreSQL pool; a worker (`wait`) waits for the server, a command does not."""
    delay, logged = 0.2, False
    server_settings = {"application_name": name[:63]} if name else None
    while True:
        try:
            return await asyncpg.create_pool(
                database_dsn(settings), min_size=1, max_size=settings.pg_pool_size, timeout=10,
                server_settings=server_settings,
            )  # fmt: skip
        except asyncpg.ClientConfigurationError as exc:  # e.g. no root certificate: no waiting
            raise ConfigError(f"invalid configuration: DATABASE_URL: {exc.args[0]}") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            where = redact_url(settings.database_url)
            if not wait:
                raise ConfigError(f"PostgreSQL at {where} unavailable: {exc}") from None
            if not logged:
                logger.error("PostgreSQL at %s unavailable (%s); waiting for it with backoff "
                             "up to 5s", where, type(exc).__name__)  # fmt: skip
                logged = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _printable(name: str | None) -> str | None:
    """A name Redis accepts for a connection: printable ASCII without spaces."""
    return None if name is None else "".join(c if "!" <= c <= "~" else "_" for c in name)


@asynccontextmanager
async def connect(
    settings: Settings,
    *,
    wait: bool = True,
    client_name: str | None = None,
    observer: Observer | None = None,
    handlers: Sequence[HandlerSpec[Any]] = HANDLERS,
) -> AsyncIterator[Deps]:
    """Open Redis, PostgreSQL and the parse pool for the lifetime of the block.

    `wait=False` (one-off commands) fails at once when PostgreSQL does not answer. The
    pool starts its processes only when something is parsed; they stop with the block.
    `client_name` names the Redis connections (`CLIENT LIST`) and PostgreSQL sessions
    (`pg_stat_activity.application_name`): a worker passes its consumer name.
    The URLs' passwords are remembered, so no log line, span or error shows them.
    `observer` counts what the publisher sends (a worker passes its metrics). The
    publisher knows the queues of `handlers` (the built-in ones by default).
    """
    remember_secrets(settings.secrets())
    if settings.tls_ca_file is not None:
        client_context(settings, "smtp")  # a missing or bad CA file fails now, named
    redis = connect_redis(
        settings.redis_url,
        cluster=settings.redis_cluster,
        client_name=_printable(client_name),
        **redis_tls_options(settings),
    )
    pool = await _pool(settings, wait, client_name)
    keys = keys_of(settings)
    parser = ParsePool(settings.parse_processes or default_processes())
    try:
        publisher = Publisher(
            redis,
            keys,
            payloads_of(handlers),
            observer=observer,
            wait_replicas=settings.publish_wait_replicas,
            wait_timeout_ms=settings.publish_wait_timeout_ms,
            partitions=partitions_of(settings, handlers),
            priorities={q: spec.policy for q, spec in by_queue(handlers).items()},
        )
        yield Deps(pool, redis, publisher, settings, keys, parser)
    finally:
        await parser.aclose()
        await pool.close()
        await redis.aclose()


def partitions_of(
    settings: Settings, handlers: Sequence[HandlerSpec[Any]] = HANDLERS
) -> dict[str, int]:
    """Queue → stream partitions, from the handlers' policies and `JOBSTREAM_POLICIES`."""
    overrides = settings.policy_overrides()
    out = {q: spec.policy.partitions for q, spec in by_queue(handlers).items()}
    for queue, fields in overrides.items():
        if "partitions" in fields:
            out[queue] = int(fields["partitions"])
    return out


def check_selection(
    settings: Settings,
    queues: Sequence[str] | None,
    handlers: Sequence[HandlerSpec[Any]] = HANDLERS,
) -> None:
    """ConfigError for an unknown queue, or for JOBSTREAM_POLICIES naming a queue not served."""
    served = {spec.queue for spec in select(handlers, queues)}
    unknown = set(settings.policy_overrides()) - served
    if unknown:
        raise ConfigError(f"JOBSTREAM_POLICIES names queues not served: {', '.join(unknown)}")


def make_engine(
    deps: Deps,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    *,
    handlers: Sequence[HandlerSpec[Any]] = HANDLERS,
    burst: bool = False,
    observer: Observer | None = None,
    consumer: str | None = None,
) -> Engine:
    """The engine serving `queues` (all by default) among `handlers` (the built-in queues
    by default: pass the complete set to add or replace one).

    ConfigError names a queue selected but not in `handlers`, or handled twice. The
    handlers publish through a publisher that knows exactly the queues of `handlers`.
    """
    s = deps.settings
    specs = select(handlers, queues)
    publisher = deps.publisher.serving(payloads_of(handlers), partitions_of(s, handlers))
    deps = dataclasses.replace(deps, publisher=publisher)
    limit = concurrency or s.concurrency
    overrides = s.policy_overrides()
    unknown = set(overrides) - {spec.queue for spec in specs}
    if unknown:
        raise ConfigError(f"JOBSTREAM_POLICIES names queues not served: {', '.join(unknown)}")
    routes = []
    for spec in specs:
        # Registration first, then configuration, then the command line.
        fields = {**_fields(spec.policy), **overrides.get(spec.queue, {})}
        if limit is not None:
            fields["concurrency"] = limit
        routes.append(spec.route(deps, Policy(**fields)))
    config = s.engine_config(
        consumer=consumer or consumer_name(s), keys=deps.keys, burst=burst,
        partitions=partition_policy(s),
    )  # fmt: skip
    return Engine(deps.redis, deps.pool, routes, config, observer)


def partition_policy(s: Settings) -> PartitionPolicy:
    """The job tables' partitioning and retention, from the settings."""
    return PartitionPolicy(
        width_s=s.partition_width_s,
        retention_s=s.retention_s,
        ahead=s.partitions_ahead,
        prune_interval_s=s.prune_interval_s,
    )


def _fields(policy: Policy) -> dict[str, Any]:
    return {f: getattr(policy, f) for f in policy.__struct_fields__}


async def run_worker(
    settings: Settings,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    *,
    handlers: Sequence[HandlerSpec[Any]] = HANDLERS,
    burst: bool = False,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    supervised: bool = False,
    supervisor: int | None = None,
) -> int:
    """Run a worker serving `queues` (all by default) among `handlers` (see `make_engine`)
    until SIGTERM/SIGINT (or drained, in burst mode); return the exit code.

    `metrics_port` serves `/metrics` on `metrics_host` (defaults: the settings'); a port
    that cannot be bound fails here, before anything connects. The worker's own commands
    run with auto-instrumentation suppressed: only jobs make spans. `supervised` (a process
    of `--processes N`): exit with EXIT_UNDRAINED when the grace period left entries
    pending, so that the supervisor can say so in its own exit code; and drain once the
    supervisor (pid `supervisor`, by default the parent) is gone.
    """
    select(handlers, queues)  # fail on an unknown queue before connecting anywhere
    consumer = consumer_name(settings)
    port = metrics_port if metrics_port is not None else settings.metrics_port
    tracing, metrics = start_telemetry(consumer, prometheus=port is not None)
    try:
        if port is not None:
            try:
                metrics.serve(port, metrics_host or settings.metrics_host)
            except MetricsError as exc:
                raise ConfigError(str(exc)) from None
        with suppressed():
            async with connect(
                settings, client_name=consumer, observer=metrics.observer, handlers=handlers
            ) as deps:
                engine = make_engine(
                    deps,
                    queues,
                    concurrency,
                    handlers=handlers,
                    burst=burst,
                    observer=metrics.observer,
                    consumer=consumer,
                )
                parent = (supervisor or os.getppid()) if supervised else None
                await _run(engine, settings, supervisor=parent)
                left = sum(len(lane.held) for lane in engine.lanes.values())
    finally:
        await metrics.aclose()
        await asyncio.to_thread(tracing.shutdown)
    return EXIT_UNDRAINED if supervised and left else 0


async def _run(engine: Engine, settings: Settings, *, supervisor: int | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.stop)
    logger.info(
        "worker %s started: queues=%s redis=%s database=%s loop=%s",
        engine.cfg.consumer,
        ",".join(engine.lanes),
        redact_url(settings.redis_url),
        redact_url(settings.database_url),
        loop_name(),
    )
    scheduler = None
    if settings.scheduler and not engine.cfg.burst:  # every replica: no leader to lose
        sched = Scheduler(
            engine.redis,
            engine.pool,
            engine.cfg.keys,
            interval_s=settings.schedule_interval_s,
            grace_s=settings.schedule_grace_s,
        )
        with suppressed():  # its polling makes no spans (the task keeps this context)
            scheduler = asyncio.create_task(sched.run(engine.stopping), name="scheduler")
    reporter = None
    if settings.health_file:
        every = settings.alive_ttl_ms / 3000
        reporter = asyncio.create_task(write_reports(engine, settings.health_file, every))
    orphan = None
    if supervisor is not None:
        orphan = asyncio.create_task(watch_supervisor(engine.stop, supervisor))
    try:
        await engine.run()
    finally:
        for task in (reporter, scheduler, orphan):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    logger.info("worker %s stopped after %d jobs", engine.cfg.consumer, engine.processed)


def service_version() -> str:
    """The installed distribution's version (`service.version` of spans and metrics)."""
    try:
        return importlib.metadata.version("jobstream")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def start_telemetry(
    consumer: str | None, *, prometheus: bool = False
) -> tuple[TracingHandle, MetricsHandle]:
    """Tracing and metrics from the `OTEL_*` variables; both no-ops when nothing is configured."""
    version = service_version()
    tracing = setup_tracing(version, consumer)
    return tracing, setup_metrics(version, consumer, prometheus=prometheus)

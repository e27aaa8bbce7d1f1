"""Everything configurable, read once from the environment and passed down explicitly.

No other module reads `os.environ`. `OTEL_*` is left to the OpenTelemetry SDK.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping

import msgspec

from jobstream.otel.redact import redact_url, secrets_of_url
from jobstream.streams import ConfigError

__all__ = ["Settings", "redact_url"]

_PLAIN = {"redis_url", "database_url", "smtp_url"}  # names fixed by the contract
_SECRET = ("redis_url", "database_url", "smtp_url")  # may carry passwords


def _env_name(field: str) -> str:
    return field.upper() if field in _PLAIN else f"JOBSTREAM_{field.upper()}"


def _parses(url: str | None) -> bool:
    """The URL splits into parts and its port, if any, is a number from 1 to 65535."""
    if url is None:
        return True
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.port != 0 and (parts.scheme == "unix" or bool(parts.hostname))
    except ValueError:
        return False


class _PolicyOverride(msgspec.Struct, forbid_unknown_fields=True):
    max_attempts: int | None = None
    backoff_base_s: float | None = None
    backoff_cap_s: float | None = None
    timeout_s: float | None = None
    concurrency: int | None = None
    partitions: int | None = None
    batch_size: int | None = None
    batch_wait_s: float | None = None


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename=_env_name):
    """Engine and platform settings (environment variable: `JOBSTREAM_<FIELD>`)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    """`REDIS_URL` names one node of a Redis Cluster; the client finds the others."""
    publish_wait_replicas: int = 0
    """A publish succeeds only once this many replicas have its writes (Redis `WAIT`)."""
    publish_wait_timeout_ms: int = 1000
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    smtp_url: str | None = None
    stream_prefix: str = "jobs:"
    job_prefix: str = "job:"
    group: str = "workers"
    consumer_name: str | None = None
    concurrency: int | None = None
    max_deliveries: int = 5
    max_payload_bytes: int = 16 * 1024 * 1024
    # Inbound mail and bounces (consumers/queues/processing.py, bounce.py).
    max_inbound_bytes: int = 10 * 1024 * 1024
    soft_bounce_limit: int = 3
    soft_bounce_window_days: int = 7
    parse_processes: int | None = None  # parser processes; default: the CPUs available
    alive_ttl_ms: int = 10_000
    reclaim_interval_s: float = 5.0
    reclaim_ceiling_ms: int = 3_600_000
    block_ms: int = 1000
    shutdown_grace_s: float = 30.0
    hash_ttl_s: int = 7 * 24 * 3600
    dead_maxlen: int = 100_000
    dead_letter_max_age_s: float = 30 * 86400
    dead_letter_max_bytes: int = 256 * 1024 * 1024
    trim_interval_s: float = 10.0
    pg_pool_size: int = 20
    # Time partitions of `jobs` and `job_executions` (streams/partitions.py).
    retention_s: float = 30 * 86400
    partition_width_s: int = 86400
    partitions_ahead: int = 3
    prune_interval_s: float = 86400
    event_loop: str = "auto"
    """`auto` (uvloop where installed), `uvloop` or `asyncio`."""
    log_level: str = "INFO"
    policies: str = ""
    """JSON overriding queues' policies, e.g. `{"webhook": {"max_attempts": 12}}`."""
    metrics_port: int | None = None
    """Serve `/metrics` for Prometheus on this port (`jobstream worker --metrics-port`)."""
    metrics_host: str = "127.0.0.1"
    """The address `/metrics` listens on: loopback unless set (`0.0.0.0`: every interface)."""
    health_file: str | None = None
    """Where a worker reports its health for `jobstream health` (e.g. in a container)."""
    tls_ca_file: str | None = None
    """A PEM file of CA certificates trusted, besides the system's, by every TLS client."""
    # Outbound mail, warmup and webhooks (consumers/queues/sending.py, warmup.py, webhook.py).
    smtp_timeout_s: float = 30.0
    unsubscribe_url: str = "https://unsubscribe.invalid/one-click"
    warmup_start_per_day: int = 5
    warmup_step_per_day: int = 2
    warmup_max_per_day: int = 40
    warmup_spread_s: float | None = None  # spread a day's warmup over this; default: rest of day
    warmup_max_bounce_rate: float = 0.05
    warmup_min_sample: int = 20
    webhook_allow_private: bool = False
    webhook_connect_timeout_s: float = 5.0
    webhook_timeout_s: float = 15.0
    webhook_max_response_bytes: int = 64 * 1024
    # The dashboard (consumers/dashboard/).
    dashboard_token: str | None = None
    """The operator's token for `jobstream dashboard` (or `dashboard_token_file`)."""
    dashboard_token_file: str | None = None
    trace_url: str | None = None
    """A trace's page, `{trace_id}` standing for its id: `http://localhost:16686/trace/{trace_id}`."""

    def __post_init__(self) -> None:
        checks = {
            "JOBSTREAM_MAX_DELIVERIES": self.max_deliveries >= 1,
            "JOBSTREAM_CONCURRENCY": self.concurrency is None or self.concurrency >= 1,
            "JOBSTREAM_ALIVE_TTL_MS": self.alive_ttl_ms >= 100,
            "JOBSTREAM_RECLAIM_INTERVAL_S": self.reclaim_interval_s > 0,
            "JOBSTREAM_RECLAIM_CEILING_MS": self.reclaim_ceiling_ms >= 1000,
            "JOBSTREAM_SHUTDOWN_GRACE_S": self.shutdown_grace_s >= 0,
            "JOBSTREAM_PG_POOL_SIZE": self.pg_pool_size >= 2,
            "JOBSTREAM_RETENTION_S": self.retention_s > 0,
            "JOBSTREAM_PARTITION_WIDTH_S": self.partition_width_s >= 1,
            "JOBSTREAM_PARTITIONS_AHEAD": self.partitions_ahead >= 1,
            "JOBSTREAM_PRUNE_INTERVAL_S": self.prune_interval_s > 0,
            "JOBSTREAM_DEAD_MAXLEN": self.dead_maxlen >= 0,
            "JOBSTREAM_DEAD_LETTER_MAX_AGE_S": self.dead_letter_max_age_s > 0,
            "JOBSTREAM_DEAD_LETTER_MAX_BYTES": self.dead_letter_max_bytes >= 0,
            "JOBSTREAM_MAX_INBOUND_BYTES": self.max_inbound_bytes >= 1,
            "JOBSTREAM_SOFT_BOUNCE_LIMIT": self.soft_bounce_limit >= 1,
            "JOBSTREAM_SOFT_BOUNCE_WINDOW_DAYS": self.soft_bounce_window_days >= 1,
            "JOBSTREAM_PARSE_PROCESSES": self.parse_processes is None or self.parse_processes >= 1,
            "REDIS_URL (redis://, rediss:// or unix://)": self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")
            ),
            "DATABASE_URL (postgresql:// or postgres://)": self.database_url.startswith(
                ("postgresql://", "postgres://")
            ),
            "REDIS_URL (a cluster takes redis:// or rediss://, database 0)": not self.redis_cluster
            or (
                self.redis_url.startswith(("redis://", "rediss://"))
                and urllib.parse.urlsplit(self.redis_url).path in ("", "/", "/0")
            ),
            "JOBSTREAM_PUBLISH_WAIT_REPLICAS": self.publish_wait_replicas >= 0,
            "JOBSTREAM_PUBLISH_WAIT_TIMEOUT_MS (1 or more)": self.publish_wait_timeout_ms >= 1,
            "JOBSTREAM_BLOCK_MS (1 to 60000)": 1 <= self.block_ms <= 60_000,
            "JOBSTREAM_EVENT_LOOP (auto, uvloop or asyncio)": self.event_loop
            in ("auto", "uvloop", "asyncio"),
            "JOBSTREAM_METRICS_PORT (1 to 65535)": self.metrics_port is None
            or 1 <= self.metrics_port <= 65535,
            "JOBSTREAM_METRICS_HOST": bool(self.metrics_host.strip()),
            "JOBSTREAM_LOG_LEVEL (DEBUG, INFO, WARNING or ERROR)": self.log_level.upper()
            in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            "SMTP_URL": self.smtp_url is None or self.smtp_url.startswith(("smtp://", "smtps://")),
            "JOBSTREAM_WARMUP_MAX_PER_DAY": 0
            <= self.warmup_start_per_day
            <= self.warmup_max_per_day,
            "JOBSTREAM_WARMUP_MAX_BOUNCE_RATE": 0 <= self.warmup_max_bounce_rate <= 1,
            "JOBSTREAM_WEBHOOK_TIMEOUT_S": 0
            < self.webhook_connect_timeout_s
            <= self.webhook_timeout_s,
            "JOBSTREAM_TRACE_URL (http(s)://... with {trace_id})": self.trace_url is None
            or (
                self.trace_url.startswith(("http://", "https://"))
                and "{trace_id}" in self.trace_url
            ),
        }
        for name, url in (
            ("REDIS_URL", self.redis_url),
            ("DATABASE_URL", self.database_url),
            ("SMTP_URL", self.smtp_url),
        ):
            checks[f"{name} (host and port 1 to 65535)"] = _parses(url)
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid configuration: {name} is out of range or malformed")
        self.policy_overrides()

    def policy_overrides(self) -> dict[str, dict[str, float]]:
        """Queue → policy fields to override, from `JOBSTREAM_POLICIES`."""
        if not self.policies.strip():
            return {}
        try:
            raw = msgspec.json.decode(self.policies, type=dict[str, _PolicyOverride])
        except msgspec.DecodeError as exc:
            raise ConfigError(f"invalid configuration: JOBSTREAM_POLICIES: {exc}") from None
        return {
            q: {k: v for k, v in msgspec.structs.asdict(o).items() if v is not None}
            for q, o in raw.items()
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings; a bad value is a one-line ConfigError naming the variable."""
        env = os.environ if environ is None else environ
        known = {_env_name(f) for f in cls.__struct_fields__}
        try:
            return msgspec.convert(
                {k: v for k, v in env.items() if k in known},
                cls,
                strict=False,
                from_attributes=False,
            )
        except msgspec.ValidationError as exc:  # names the variable, never echoes the value
            raise ConfigError(f"invalid configuration: {exc}") from None

    def secrets(self) -> list[str]:
        """The passwords and secret query parameters of the configured URLs."""
        found = [v for f in _SECRET for v in secrets_of_url(getattr(self, f))]
        return found + ([self.dashboard_token] if self.dashboard_token else [])

    def __repr__(self) -> str:
        shown = {
            f: (redact_url(getattr(self, f)) if f in _SECRET else getattr(self, f))
            for f in self.__struct_fields__
        }
        if self.dashboard_token is not None:
            shown["dashboard_token"] = "***"
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

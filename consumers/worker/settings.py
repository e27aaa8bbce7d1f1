"""Everything configurable, read once from the environment and passed down explicitly.

No other module reads `os.environ`. `OTEL_*` is left to the OpenTelemetry SDK.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from jobstream.otel.redact import redact_url, secrets_of_url
from jobstream.streams import ConfigError, EngineConfig, Keys

__all__ = ["Settings", "redact_url"]

_PLAIN = {"redis_url", "database_url", "smtp_url"}  # names fixed by the contract
_SECRET = ("redis_url", "database_url", "smtp_url")  # may carry passwords
_ENGINE = EngineConfig(consumer="")  # the engine's defaults live there, once
# Settings that the engine calls by another name; every other engine field shares its name.
_ENGINE_NAME = {
    "shutdown_grace_s": "grace_s",
    "dead_letter_max_age_s": "dead_max_age_s",
    "dead_letter_max_bytes": "dead_max_bytes",
    "publish_wait_replicas": "wait_replicas",
    "publish_wait_timeout_ms": "wait_timeout_ms",
}

# Single-field bounds, checked by msgspec, so an error names the variable at fault.
AtLeast0 = Annotated[int, msgspec.Meta(ge=0)]
AtLeast1 = Annotated[int, msgspec.Meta(ge=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


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
    publish_wait_replicas: int = _ENGINE.wait_replicas
    """A publish succeeds only once this many replicas have its writes (Redis `WAIT`)."""
    publish_wait_timeout_ms: int = _ENGINE.wait_timeout_ms
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    smtp_url: str | None = None
    stream_prefix: str = "jobs:"
    job_prefix: str = "job:"
    group: str = _ENGINE.group
    consumer_name: str | None = None
    concurrency: AtLeast1 | None = None
    max_deliveries: AtLeast1 = _ENGINE.max_deliveries
    max_payload_bytes: int = _ENGINE.max_payload_bytes
    # Inbound mail and bounces (consumers/queues/processing.py, bounce.py).
    max_inbound_bytes: AtLeast1 = 10 * 1024 * 1024
    soft_bounce_limit: AtLeast1 = 3
    soft_bounce_window_days: AtLeast1 = 7
    parse_processes: AtLeast1 | None = None  # parser processes; default: the CPUs available
    alive_ttl_ms: Annotated[int, msgspec.Meta(ge=100)] = _ENGINE.alive_ttl_ms
    reclaim_interval_s: Positive = _ENGINE.reclaim_interval_s
    reclaim_ceiling_ms: Annotated[int, msgspec.Meta(ge=1000)] = _ENGINE.reclaim_ceiling_ms
    block_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = _ENGINE.block_ms
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = _ENGINE.grace_s
    hash_ttl_s: int = _ENGINE.hash_ttl_s
    dead_maxlen: AtLeast0 = _ENGINE.dead_maxlen
    dead_letter_max_age_s: Positive = _ENGINE.dead_max_age_s
    dead_letter_max_bytes: AtLeast0 = _ENGINE.dead_max_bytes
    trim_interval_s: float = _ENGINE.trim_interval_s
    progress_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = _ENGINE.progress_interval_s
    """Handlers' progress reaches the job hashes at most this late (coalesced writes)."""
    scheduler: bool = True
    """Run the scheduler loop in this worker (every replica may: no leader)."""
    schedule_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    """How often the scheduler looks for due occurrences."""
    schedule_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """An occurrence older than this when found is missed: its catch-up policy decides."""
    pg_pool_size: Annotated[int, msgspec.Meta(ge=2)] = 20
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
    warmup_start_per_day: AtLeast0 = 5
    warmup_step_per_day: int = 2
    warmup_max_per_day: AtLeast0 = 40
    warmup_spread_s: float | None = None  # spread a day's warmup over this; default: rest of day
    warmup_max_bounce_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    warmup_min_sample: int = 20
    webhook_allow_private: bool = False
    webhook_connect_timeout_s: Positive = 5.0
    webhook_timeout_s: Positive = 15.0
    webhook_max_response_bytes: int = 64 * 1024
    # The dashboard (consumers/dashboard/).
    dashboard_token: str | None = None
    """The operator's token for `jobstream dashboard` (or `dashboard_token_file`)."""
    dashboard_token_file: str | None = None
    trace_url: str | None = None
    """A trace's page, `{trace_id}` standing for its id: `http://localhost:16686/trace/{trace_id}`."""

    def __post_init__(self) -> None:
        checks = {  # the checks msgspec.Meta cannot express: formats and pairs of fields
            "JOBSTREAM_RETENTION_S": self.retention_s > 0,
            "JOBSTREAM_PARTITION_WIDTH_S": self.partition_width_s >= 1,
            "JOBSTREAM_PARTITIONS_AHEAD": self.partitions_ahead >= 1,
            "JOBSTREAM_PRUNE_INTERVAL_S": self.prune_interval_s > 0,
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
            "JOBSTREAM_EVENT_LOOP (auto, uvloop or asyncio)": self.event_loop
            in ("auto", "uvloop", "asyncio"),
            "JOBSTREAM_METRICS_PORT (1 to 65535)": self.metrics_port is None
            or 1 <= self.metrics_port <= 65535,
            "JOBSTREAM_METRICS_HOST": bool(self.metrics_host.strip()),
            "JOBSTREAM_LOG_LEVEL (DEBUG, INFO, WARNING or ERROR)": self.log_level.upper()
            in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            "SMTP_URL": self.smtp_url is None or self.smtp_url.startswith(("smtp://", "smtps://")),
            "JOBSTREAM_WARMUP_START_PER_DAY (at most JOBSTREAM_WARMUP_MAX_PER_DAY)": (
                self.warmup_start_per_day <= self.warmup_max_per_day
            ),
            "JOBSTREAM_WEBHOOK_CONNECT_TIMEOUT_S (at most JOBSTREAM_WEBHOOK_TIMEOUT_S)": (
                self.webhook_connect_timeout_s <= self.webhook_timeout_s
            ),
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

    def engine_config(
        self, *, consumer: str, keys: Keys, burst: bool = False, **more: Any
    ) -> EngineConfig:
        """The engine's configuration: every engine field these settings hold, by keyword
        (`more`: the fields built from several settings, e.g. `partitions`)."""
        fields = {_ENGINE_NAME.get(f, f): getattr(self, f) for f in _ENGINE_FIELDS}
        return EngineConfig(consumer=consumer, keys=keys, burst=burst, **fields, **more)

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


_ENGINE_FIELDS = tuple(
    f for f in Settings.__struct_fields__
    if _ENGINE_NAME.get(f, f) in {e.name for e in dataclasses.fields(EngineConfig)}
)  # fmt: skip

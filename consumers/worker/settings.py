"""Everything configurable, read once from the environment and passed down explicitly.

No other module reads `os.environ`. `OTEL_*` is left to the OpenTelemetry SDK.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from typing import Annotated

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


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename=_env_name):
    """Engine and platform settings (environment variable: `JOBSTREAM_<FIELD>`)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
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
    pg_pool_size: Annotated[int, msgspec.Meta(ge=2)] = 20
    log_level: str = "INFO"
    policies: str = ""
    """JSON overriding queues' policies, e.g. `{"webhook": {"max_attempts": 12}}`."""
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

    def __post_init__(self) -> None:
        checks = {  # the checks msgspec.Meta cannot express: formats and pairs of fields
            "REDIS_URL (redis://, rediss:// or unix://)": self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")
            ),
            "DATABASE_URL (postgresql:// or postgres://)": self.database_url.startswith(
                ("postgresql://", "postgres://")
            ),
            "JOBSTREAM_LOG_LEVEL (DEBUG, INFO, WARNING or ERROR)": self.log_level.upper()
            in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            "SMTP_URL": self.smtp_url is None or self.smtp_url.startswith(("smtp://", "smtps://")),
            "JOBSTREAM_WARMUP_START_PER_DAY (at most JOBSTREAM_WARMUP_MAX_PER_DAY)": (
                self.warmup_start_per_day <= self.warmup_max_per_day
            ),
            "JOBSTREAM_WEBHOOK_CONNECT_TIMEOUT_S (at most JOBSTREAM_WEBHOOK_TIMEOUT_S)": (
                self.webhook_connect_timeout_s <= self.webhook_timeout_s
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

    def engine_config(self, *, consumer: str, keys: Keys, burst: bool = False) -> EngineConfig:
        """The engine's configuration: every engine field these settings hold, by keyword."""
        fields = {_ENGINE_NAME.get(f, f): getattr(self, f) for f in _ENGINE_FIELDS}
        return EngineConfig(consumer=consumer, keys=keys, burst=burst, **fields)

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
        return [v for f in _SECRET for v in secrets_of_url(getattr(self, f))]

    def __repr__(self) -> str:
        shown = {
            f: (redact_url(getattr(self, f)) if f in _SECRET else getattr(self, f))
            for f in self.__struct_fields__
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


_ENGINE_FIELDS = tuple(
    f for f in Settings.__struct_fields__
    if _ENGINE_NAME.get(f, f) in {e.name for e in dataclasses.fields(EngineConfig)}
)  # fmt: skip

"""Everything configurable, read once from the environment and passed down explicitly.

No other module reads `os.environ`. `OTEL_*` is left to the OpenTelemetry SDK.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import msgspec

from streams import ConfigError

__all__ = ["Settings", "redact_url"]

_PLAIN = {"redis_url", "database_url", "smtp_url"}  # names fixed by the contract
_SECRET = ("redis_url", "database_url", "smtp_url")  # may carry passwords


def _env_name(field: str) -> str:
    return field.upper() if field in _PLAIN else f"JOBSTREAM_{field.upper()}"


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced by `***`."""
    if url is None:
        return None
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename=_env_name):
    """Engine and platform settings (environment variable: `JOBSTREAM_<FIELD>`)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    smtp_url: str | None = None
    stream_prefix: str = "jobs:"
    job_prefix: str = "job:"
    group: str = "workers"
    consumer_name: str | None = None
    concurrency: int | None = None
    max_deliveries: int = 5
    max_payload_bytes: int = 16 * 1024 * 1024
    alive_ttl_ms: int = 10_000
    reclaim_interval_s: float = 5.0
    reclaim_ceiling_ms: int = 3_600_000
    block_ms: int = 1000
    shutdown_grace_s: float = 30.0
    hash_ttl_s: int = 7 * 24 * 3600
    dead_maxlen: int = 100_000
    trim_interval_s: float = 10.0
    pg_pool_size: int = 20
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        checks = {
            "JOBSTREAM_MAX_DELIVERIES": self.max_deliveries >= 1,
            "JOBSTREAM_CONCURRENCY": self.concurrency is None or self.concurrency >= 1,
            "JOBSTREAM_ALIVE_TTL_MS": self.alive_ttl_ms >= 100,
            "JOBSTREAM_RECLAIM_INTERVAL_S": self.reclaim_interval_s > 0,
            "JOBSTREAM_RECLAIM_CEILING_MS": self.reclaim_ceiling_ms >= 1000,
            "JOBSTREAM_SHUTDOWN_GRACE_S": self.shutdown_grace_s >= 0,
            "JOBSTREAM_PG_POOL_SIZE": self.pg_pool_size >= 2,
            "REDIS_URL": self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "DATABASE_URL": self.database_url.startswith(("postgresql://", "postgres://")),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid configuration: {name} is out of range or malformed")

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

    def __repr__(self) -> str:
        shown = {
            f: (redact_url(getattr(self, f)) if f in _SECRET else getattr(self, f))
            for f in self.__struct_fields__
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

"""What handlers may use: PostgreSQL and Redis, the publisher, the settings, the parse pool."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from jobstream.consumers.worker.parsepool import ParsePool
from jobstream.consumers.worker.settings import Settings
from jobstream.streams import Keys, Publisher
from jobstream.streams.redis_client import AnyRedis

__all__ = ["Deps"]


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    redis: AnyRedis
    publisher: Publisher
    settings: Settings
    keys: Keys
    parser: ParsePool  # CPU-heavy mail parsing, in processes of its own

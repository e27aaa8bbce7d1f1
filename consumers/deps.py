"""What handlers may use: PostgreSQL and Redis, the publisher, the settings, the parse pool."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from consumers.parsepool import ParsePool
from consumers.settings import Settings
from streams import Keys, Publisher
from streams.redis_client import AnyRedis

__all__ = ["Deps"]


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    redis: AnyRedis
    publisher: Publisher
    settings: Settings
    keys: Keys
    parser: ParsePool  # CPU-heavy mail parsing, in processes of its own

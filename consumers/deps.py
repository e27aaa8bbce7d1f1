"""What handlers may use: the PostgreSQL pool, Redis, the publisher and the settings."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from consumers.settings import Settings
from streams import Keys, Publisher

__all__ = ["Deps"]


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    publisher: Publisher
    settings: Settings
    keys: Keys

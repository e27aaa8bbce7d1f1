"""Apply `schema/migrations/NNNN_name.sql` in order, once each, one transaction per file.

Safe when several replicas run it at once: a session advisory lock serialises them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

__all__ = ["Migration", "MigrationMismatch", "apply_migrations", "load_migrations"]

_LOCK_KEY = 0x6A6F6273  # "jobs": any constant shared by every replica
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_VERSIONS_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
APPLIED_SQL = "SELECT version, name FROM schema_migrations"
RECORD_SQL = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"


class MigrationMismatch(RuntimeError):
    """The database's recorded migrations are not this code's."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Read the packaged migration files, ordered by version."""
    found = []
    for item in resources.files("jobstream.schema.migrations").iterdir():
        match = _NAME.match(item.name)
        if match:
            found.append(Migration(int(match[1]), match[2], item.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def apply_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Apply what is missing and return it; a second run applies nothing.

    Raises MigrationMismatch, applying nothing, when the database recorded a version
    under another name than this code's file of that number (two branches' migrations
    numbered alike): running on would skip one of them for good.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(CREATE_VERSIONS_SQL)
        done = {row["version"]: row["name"] for row in await conn.fetch(APPLIED_SQL)}
        migrations = load_migrations()
        clash = [
            f"{m.version:04d} is {done[m.version]!r} in the database but {m.name!r} here"
            for m in migrations
            if m.version in done and done[m.version] != m.name
        ]
        if clash:
            raise MigrationMismatch("migrations disagree: " + "; ".join(clash))
        applied = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(RECORD_SQL, migration.version, migration.name)
            applied.append(migration)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)

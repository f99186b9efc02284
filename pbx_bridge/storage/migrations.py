"""Apply the SQL migrations in sql/migrations, once each, recorded in `schema_migrations`."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
ADVISORY_LOCK_ID = 0x7062786272  # "pbxbr": one migrator at a time
SQL_DIR_ENV = "PBX_BRIDGE_SQL_DIR"


class MigrationError(Exception):
    """The migrations cannot be applied safely (missing, changed after applying, or failing)."""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def sql_dir() -> Path:
    """$PBX_BRIDGE_SQL_DIR, else the checkout's sql/, else the installed share/pbx-bridge/sql."""
    candidates = [Path(p) for p in [os.environ.get(SQL_DIR_ENV)] if p]
    candidates += [Path(__file__).resolve().parents[2] / "sql", Path(sys.prefix) / "share" / "pbx-bridge" / "sql"]
    for candidate in candidates:
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError(f"no sql/migrations directory found (looked in {', '.join(map(str, candidates))})")


def discover(directory: Path) -> list[Migration]:
    """The migrations in `directory`/migrations, in version order."""
    found = []
    for path in sorted((directory / "migrations").iterdir()):
        match = MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(version=match.group(1), path=path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction; return their names."""
    migrations = discover(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    text PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"]: r["checksum"] for r in await conn.fetch(
            "SELECT version, checksum FROM schema_migrations")}
        done = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{migration.path.name} was changed after it was applied; add a new migration instead")
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version, migration.path.name, migration.checksum)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.path.name} failed: {exc}") from exc
            done.append(migration.path.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)

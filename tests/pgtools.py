"""URL helpers for tests that talk to the test PostgreSQL directly (see tests/conftest.py)."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name."""
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """asyncpg's own DSN for a postgresql+asyncpg:// URL (asyncpg.connect(asyncpg_dsn(url)))."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

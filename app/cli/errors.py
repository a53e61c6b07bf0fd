"""Errors the CLI reports as one line (`kvthreads: ...`) and an exit code, never a traceback."""

from __future__ import annotations

import asyncio
import socket

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db import migrate
from app.db.session import create_engine, ping

CONNECT_TIMEOUT_S = 5.0


class CliError(Exception):
    """A failure the user can act on; the message is the whole story."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def database_label(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database}"


def _reason(exc: BaseException) -> str:
    """The database driver's own words, without SQLAlchemy's wrapping."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig = exc.orig
        inner = getattr(orig, "__cause__", None) or orig
        return str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def require_database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise CliError(
            "DATABASE_URL is not set (`make run` and `make migrate` use a local database)", 2
        )
    return settings.database_url


async def _check(url: str, *, migrated: bool) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        try:
            await asyncio.wait_for(ping(engine), timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure here is "unreachable"
            raise CliError(
                f"cannot reach the database at {database_label(url)}: {_reason(exc)}"
            ) from None
        if migrated:
            current, head = await migrate.current_revision(engine), migrate.head_revision()
            if current != head:
                raise CliError(
                    f"the database at {database_label(url)} is at schema revision "
                    f"{current or '(none)'}, not {head}: run `python -m app migrate` (or make migrate)"
                )
    finally:
        await engine.dispose()


def check_database(settings: Settings, *, migrated: bool) -> str:
    """Fail with one line unless the database answers (and, if asked, is at the head revision)."""
    url = require_database_url(settings)
    asyncio.run(_check(url, migrated=migrated))
    return url

"""Whether an exception means "the database cannot be reached now" (a 503) rather than a bug (500).

    if is_database_unavailable(exc): ...   # answer 503 database_unavailable, Retry-After

Down, frozen, restarting or out of connections, the database shows itself in several shapes:
asyncpg's connection errors and SQLSTATEs of classes 08 (connection), 53 (resources) and
57 (operator intervention: shutdown, statement_timeout), SQLAlchemy's pool timeout and
invalidated connections, and the plain TimeoutError or OSError (refused, reset) that the driver
lets through when the connect or a statement times out. The last two are the database's only
when they were raised inside the driver, so the traceback is what tells.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})
DRIVER_MODULES = ("asyncpg", "sqlalchemy")


def is_database_unavailable(exc: BaseException) -> bool:
    for error in _causes(exc):
        if isinstance(error, sa_exc.TimeoutError):  # no pooled connection came free in time
            return True
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        sqlstate = getattr(error, "sqlstate", None)  # asyncpg's PostgresError and its kin
        if isinstance(sqlstate, str) and sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES:
            return True
        if isinstance(error, TimeoutError | OSError) and _raised_in_driver(error):
            return True
    return False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps (SQLAlchemy's `orig`), its causes and contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        for inner in (getattr(error, "orig", None), error.__cause__, error.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _raised_in_driver(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] in DRIVER_MODULES:
            return True
        tb = tb.tb_next
    return False

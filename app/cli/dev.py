"""`dev`: the developer's commands behind `make db`, `make db-stop`, `make db-url` and `make run`.

    dev db start    start (making it the first time) the local PostgreSQL in .data/pg; print its URL
    dev db url      print its URL
    dev db status   say whether it runs (exit 3 when it does not)
    dev db stop     stop it; its data stays
    dev run         local database, migrate, an API key, then serve in the foreground

With DATABASE_URL set, `db start`, `db url` and `run` use that server and start none. There is one
migrate: `make migrate` runs `migrate` with DATABASE_URL from `dev db start`.

The code is devtools/ (not part of the served package), imported only when one of these runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from app.cli.errors import CliError
from app.config import Settings

NOT_RUNNING_EXIT = 3  # `dev db status` when the local cluster is stopped


@contextlib.contextmanager
def _cluster_errors() -> Iterator[None]:
    """A cluster that cannot be made, started or stopped is a one-line CLI failure."""
    from devtools.postgres import ClusterError

    try:
        yield
    except ClusterError as exc:
        raise CliError(str(exc)) from None


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from devtools.postgres.cluster import local_database_url, run_cluster

    with _cluster_errors():
        if args.action in ("start", "url"):
            print(local_database_url(settings, start=args.action == "start"))
            return 0
        cluster = run_cluster(settings)
        if args.action == "status":
            running = cluster.is_running()
            print(f"kvthreads: {cluster.root}: {'running' if running else 'stopped'}")
            return 0 if running else NOT_RUNNING_EXIT
        was_running = cluster.stop()
        print(
            f"kvthreads: {'stopped' if was_running else 'was not running'} ({cluster.root})",
            file=sys.stderr,
        )
        return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from devtools.run import run

    with _cluster_errors():
        return run(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dev", help="developer tools: the local PostgreSQL (dev db), make run (dev run)"
    )
    commands = parser.add_subparsers(dest="dev_command", required=True, metavar="DEV_COMMAND")
    db = commands.add_parser("db", help="the local PostgreSQL of `make run` (.data/pg)")
    db.add_argument("action", choices=("start", "stop", "url", "status"))
    db.set_defaults(handler=_db)
    run = commands.add_parser(
        "run", help="local database (unless DATABASE_URL), migrate, API key, serve"
    )
    run.set_defaults(handler=_run)

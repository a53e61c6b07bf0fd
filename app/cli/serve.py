"""`serve`: check the database, then run the app under uvicorn in the foreground."""

from __future__ import annotations

import argparse
import logging

from app.cli.errors import CliError, check_database
from app.config import Settings

# Ctrl-C lets turns in flight finish for this long, then cancels them: a cancelled turn commits
# nothing and rolls its thread's cache back (without a limit, a long reply would hold the stop).
GRACEFUL_SHUTDOWN_S = 5


def run_server(settings: Settings) -> int:
    import uvicorn

    from app.asgi import create_app
    from app.engine.loading.hf_config import ModelLoadError
    from app.threads.runtime_factory import (
        EXIT_DEVICE_FAULT,
        build_runtime_in_own_thread,
        device_fault,
    )

    check_database(settings, migrated=True)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The model loads (and its kernels warm up) before the port opens, so that a model the
    # engine cannot serve stops the command with one line instead of a failed ASGI startup.
    try:
        runtime = build_runtime_in_own_thread(settings)
    except ModelLoadError as exc:
        raise CliError(f"cannot serve {settings.model}: {exc}", exit_code=2) from None
    try:
        uvicorn.run(
            create_app(settings, runtime),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    finally:
        runtime.engine.shutdown()  # in-flight turns roll back; resident KV goes to disk
    return EXIT_DEVICE_FAULT if device_fault() is not None else 0


def _handle(settings: Settings, args: argparse.Namespace) -> int:
    return run_server(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the HTTP service (KVTHREADS_HOST:KVTHREADS_PORT)"
    )
    parser.set_defaults(handler=_handle)

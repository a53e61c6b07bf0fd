"""Throwaway clusters for the tests and benches: a fresh cluster on a free port in a temporary
folder, made for speed (no fsync) and removed on exit.

    with throwaway_cluster() as cluster:
        url = cluster.url()

A test process that is killed cannot remove its cluster: each cluster records its owner's pid, and
the next throwaway_cluster() stops and removes those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from devtools.postgres import ClusterError
from devtools.postgres.cluster import LocalCluster
from devtools.postgres.os_user import can_reach, server_account

THROWAWAY_PREFIX = "kvt-pg-"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


@contextlib.contextmanager
def throwaway_cluster(bindir_override: str | None = None) -> Iterator[LocalCluster]:
    """A fresh cluster on a free port in a temporary folder, removed on exit (the tests' one)."""
    account = server_account()
    base = Path(tempfile.gettempdir())
    if not can_reach(account, base, "-x"):
        base = Path("/var/tmp")
    _reap_abandoned(base)
    root = Path(tempfile.mkdtemp(prefix=THROWAWAY_PREFIX, dir=base))
    cluster = LocalCluster(root, port=free_port(), bindir_override=bindir_override, durable=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(remove=True)

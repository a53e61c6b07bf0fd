"""Faults of a test's own PostgreSQL cluster (devtools/postgres/throwaway.py): freeze and thaw it.

`with frozen(cluster):` SIGSTOPs every server process: connections are accepted by the kernel
and nothing answers. `cluster.stop()` then `cluster.start()` takes it down (an immediate
shutdown for a throwaway cluster) and up again on the same port.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from devtools.postgres.cluster import LocalCluster


def server_pids(cluster: LocalCluster) -> list[int]:
    """The postmaster and its children (backends, checkpointer, walwriter, ...)."""
    postmaster = int((cluster.pgdata / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == postmaster:
            pids.append(int(entry))
    return pids


@contextmanager
def frozen(cluster: LocalCluster) -> Iterator[None]:
    pids = server_pids(cluster)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

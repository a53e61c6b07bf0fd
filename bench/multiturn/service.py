"""Starting and stopping what the benchmark drives: a database, an API key, service instances.

Each mode is its own `python -m app serve` process on its own port, configured only through the
environment (KVTHREADS_RESIDENCY on/off, KVTHREADS_KV_CACHE_MB, ...), exactly as an operator would
run it. All instances share one database: a throwaway cluster (devtools/postgres/throwaway.py,
removed afterwards) unless a DATABASE_URL is given. One dedicated account and key drive them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY_NAME = "bench-multiturn"
READY_TIMEOUT_S = 180  # model build + imports; the bench-size model takes a few seconds
STOP_TIMEOUT_S = 20


class LaunchError(RuntimeError):
    """A database, migration, key or service instance could not be set up; says why."""


def _app_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def _run_app(args: list[str], env: Mapping[str, str]) -> str:
    """Run an app command to completion; its stdout, or LaunchError with its stderr."""
    result = subprocess.run(
        _app_command(*args), env=dict(env), capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise LaunchError(f"python -m app {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def base_environment(database_url: str) -> dict[str, str]:
    """The parent's environment minus its KVTHREADS_* settings (the benchmark sets its own, so a
    developer's shell cannot skew one mode), plus the database.

    OpenMP threads sleep instead of spinning when idle (OMP_WAIT_POLICY=PASSIVE, unless the
    environment says otherwise): the engine uses every core, and on a shared machine spinning
    threads that lose their core made CPU steps 10-20x slower in our measurements.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTHREADS_")}
    env["DATABASE_URL"] = database_url
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def apply_environment(env: dict[str, str], changes: dict[str, str | None]) -> None:
    """Set the variables of `changes` in `env`, removing those it maps to None."""
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value


def prepare_database(database_url: str) -> str:
    """Migrate the database and make the benchmark's account; returns its API key."""
    env = base_environment(database_url)
    _run_app(["migrate"], env)
    key = _run_app(["keys", "create", "--name", KEY_NAME], env).strip().splitlines()
    if not key:
        raise LaunchError("keys create printed no key")
    return key[-1].strip()


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """`url` as it is, or a throwaway local cluster for the duration (removed on exit)."""
    if url:
        yield url
        return
    from devtools.postgres.throwaway import throwaway_cluster

    with throwaway_cluster() as cluster:
        yield cluster.url()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceInstance:
    """One `python -m app serve` process with its own settings and log file."""

    name: str  # e.g. "cache" or "recompute-pressure"
    settings: dict[str, str | None]  # KVTHREADS_* variables for this instance; None: unset
    database_url: str
    log_path: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None:
            raise LaunchError(f"instance {self.name} is already started")
        self.port = self.port or free_port()
        env = base_environment(self.database_url)
        apply_environment(env, self.settings)
        env.update(KVTHREADS_HOST="127.0.0.1", KVTHREADS_PORT=str(self.port))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # A session of its own: the stop signal reaches the server and nothing else of ours.
            self.process = subprocess.Popen(
                _app_command("serve"),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll /healthz until it answers 200; LaunchError with the log's tail if the process
        dies or the time runs out."""
        if self.process is None:
            raise LaunchError(f"instance {self.name} was never started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(
                    f"instance {self.name} exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise LaunchError(
            f"instance {self.name} not ready after {timeout_s:.0f} s: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL if it lingers. Idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running(instances: list[ServiceInstance]) -> Iterator[list[ServiceInstance]]:
    """Start every instance (in parallel: each builds its model), wait until all answer, and stop
    them all on exit, whatever happens."""
    try:
        for instance in instances:
            instance.start()
        for instance in instances:
            instance.wait_ready()
        yield instances
    finally:
        for instance in instances:
            instance.stop()

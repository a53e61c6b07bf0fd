"""`python -m app`: serve, migrate and keys, as a user runs them (real processes)."""

from __future__ import annotations

from pathlib import Path

from tests.integration._processes import clean_env, interrupt, run_cli, start, wait_healthy
from tests.ports import free_port


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_malformed_database_url_fails_with_one_line() -> None:
    result = run_cli("app", "serve", env=clean_env(DATABASE_URL="postgresql://u@h:port/d"))
    assert result.returncode == 2
    assert _one_line(result.stderr).startswith("kvthreads: configuration error: DATABASE_URL")


def test_unknown_setting_fails_with_one_line() -> None:
    result = run_cli("app", "migrate", env=clean_env(KVTHREADS_PROT="1"))
    assert result.returncode == 2
    assert "KVTHREADS_PORT" in _one_line(result.stderr)


def test_unreachable_database_fails_with_one_line() -> None:
    url = f"postgresql://u:p@127.0.0.1:{free_port()}/d"
    result = run_cli("app", "serve", env=clean_env(DATABASE_URL=url))
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith("kvthreads: cannot reach the database at 127.0.0.1:")
    assert "refused" in line


def test_serve_refuses_a_database_that_is_not_migrated(empty_db_url: str) -> None:
    result = run_cli("app", "serve", env=clean_env(DATABASE_URL=empty_db_url))
    assert result.returncode == 1
    assert "migrate" in _one_line(result.stderr)


def test_migrate_then_keys_create_list_revoke(empty_db_url: str) -> None:
    env = clean_env(DATABASE_URL=empty_db_url)
    migrated = run_cli("app", "migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr

    made = run_cli("app", "keys", "create", "--name", "alice", env=env)
    assert made.returncode == 0, made.stderr
    key = _one_line(made.stdout)
    assert key.startswith("kvt_") and len(key) == 4 + 43

    listed = run_cli("app", "keys", "list", env=env)
    assert listed.returncode == 0
    assert key not in listed.stdout  # the secret is never shown again
    assert "alice" in listed.stdout and key[:12] in listed.stdout and "active" in listed.stdout

    revoked = run_cli("app", "keys", "revoke", key[:12], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in run_cli("app", "keys", "list", env=env).stdout

    unknown = run_cli("app", "keys", "revoke", "kvt_nosuchkey", env=env)
    assert unknown.returncode == 1
    assert "no key matches" in _one_line(unknown.stderr)


def test_keys_create_needs_a_name() -> None:
    result = run_cli("app", "keys", "create", "--name", " ", env=clean_env())
    assert result.returncode == 2
    assert "--name" in _one_line(result.stderr)


def test_serve_answers_healthz_and_stops_on_ctrl_c(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=db_url, KVTHREADS_PORT=str(port))
    log = tmp_path / "serve.log"
    server = start("app", "serve", env=env, log=log)
    try:
        response = wait_healthy(server, f"http://127.0.0.1:{port}/healthz", log)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "database": "ok"}
    finally:
        assert interrupt(server) == 0, log.read_text()


def test_served_commands_never_load_devtools() -> None:
    # `dev` imports devtools/ only when it runs: the CLI with all its parsers loads none of it.
    result = run_cli("app", "--help", env=clean_env(PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "app.cli.dev" in imported  # the import log is there
    assert not [name for name in imported if name.split(".")[0] == "devtools"]

"""Settings from the environment: defaults, normalisation, and clear failures."""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
from pathlib import Path

import pytest

from app.config import ConfigError, Settings, load_settings


def test_defaults_from_an_empty_environment() -> None:
    settings = load_settings({})
    assert settings.database_url is None
    assert settings.model == "builtin-tiny-random"
    assert (settings.device, settings.dtype) == ("auto", "auto")
    # No pool size or step budget: both come from the device (app/engine/network/pool_sizing.py)
    assert (settings.kv_cache_mb, settings.block_size) == (None, 16)
    assert (settings.max_batch_tokens, settings.max_num_seqs) == (None, 32)
    assert settings.gpu_memory_utilization == 0.9
    assert settings.residency is True
    assert settings.cpu_kernels is True
    assert (settings.max_message_bytes, settings.default_max_tokens) == (32768, 256)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.prices is None
    assert settings.log_level == "info"
    assert settings.secure_cookies is True
    assert (settings.rate_limit_per_minute, settings.sign_in_limit_per_minute) == (600, 10)
    assert settings.max_turns_in_flight == 16
    assert (settings.monthly_token_budget, settings.monthly_spend_budget) == (0, None)
    assert (settings.db_connect_timeout_s, settings.db_pool_timeout_s) == (2.0, 5.0)
    assert settings.db_statement_timeout_s == 5.0
    assert len(settings.secret) >= 32
    assert settings.from_environment == frozenset()


@pytest.mark.parametrize("raw", ["0", "1.5", "-0.2", "most"])
def test_gpu_memory_utilization_must_be_a_fraction(raw: str) -> None:
    with pytest.raises(ConfigError, match="KVTHREADS_GPU_MEMORY_UTILIZATION"):
        load_settings({"KVTHREADS_GPU_MEMORY_UTILIZATION": raw})
    assert load_settings({"KVTHREADS_GPU_MEMORY_UTILIZATION": "0.5"}).gpu_memory_utilization == 0.5


def test_unset_secret_is_random_per_load() -> None:
    assert load_settings({}).secret != load_settings({}).secret


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5433/d", "postgresql+asyncpg://u:p@h:5433/d"),
        ("postgres://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("postgresql+asyncpg://u:p%40x@h/d", "postgresql+asyncpg://u:p%40x@h/d"),
    ],
)
def test_database_url_is_normalised_to_asyncpg(given: str, expected: str) -> None:
    assert load_settings({"DATABASE_URL": given}).database_url == expected


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DATABASE_URL": "mysql://u@h/d"}, "postgresql+asyncpg"),
        ({"DATABASE_URL": "postgresql+psycopg://u@h/d"}, "postgresql+asyncpg"),
        ({"DATABASE_URL": "postgresql://u@h"}, "names no database"),
        ({"DATABASE_URL": "not a url"}, "malformed"),
        ({"DATABASE_URL": "postgresql://u@h:port/d"}, "malformed"),
        ({"KVTHREADS_PORT": "eighty"}, "KVTHREADS_PORT must be an integer"),
        ({"KVTHREADS_PORT": "70000"}, "KVTHREADS_PORT must be between 0 and 65535"),
        ({"KVTHREADS_KV_CACHE_MB": "0"}, "KVTHREADS_KV_CACHE_MB must be >= 1"),
        ({"KVTHREADS_DEVICE": "tpu"}, "KVTHREADS_DEVICE must be one of auto, cpu, cuda"),
        ({"KVTHREADS_DTYPE": "int8"}, "KVTHREADS_DTYPE must be one of"),
        ({"KVTHREADS_RESIDENCY": "maybe"}, "KVTHREADS_RESIDENCY must be on or off"),
        ({"KVTHREADS_LOG_LEVEL": "loud"}, "KVTHREADS_LOG_LEVEL"),
        ({"KVTHREADS_SECRET": "short"}, "at least 16"),
        ({"KVTHREADS_PRICES": "/no/such/prices.toml"}, "no such file"),
        ({"KVTHREADS_MODEL": "/no/such/model"}, "neither a built-in model"),
        ({"KVTHREADS_HOST": "a b"}, "KVTHREADS_HOST"),
        ({"KVTHREADS_PG_BINDIR": "/nowhere"}, "no postgres binary"),
        ({"KVTHREADS_RATE_LIMIT_PER_MINUTE": "-1"}, "KVTHREADS_RATE_LIMIT_PER_MINUTE must be >= 0"),
        ({"KVTHREADS_MAX_TURNS_IN_FLIGHT": "many"}, "KVTHREADS_MAX_TURNS_IN_FLIGHT must be an"),
        ({"KVTHREADS_MONTHLY_SPEND_BUDGET": "ten"}, "KVTHREADS_MONTHLY_SPEND_BUDGET must be a"),
        ({"KVTHREADS_MONTHLY_SPEND_BUDGET": "-1"}, "KVTHREADS_MONTHLY_SPEND_BUDGET must be a"),
        ({"KVTHREADS_SECURE_COOKIES": "maybe"}, "KVTHREADS_SECURE_COOKIES must be on or off"),
        ({"KVTHREADS_DB_CONNECT_TIMEOUT_S": "soon"}, "must be a number of seconds"),
        ({"KVTHREADS_DB_POOL_TIMEOUT_S": "0"}, "KVTHREADS_DB_POOL_TIMEOUT_S must be between"),
        ({"KVTHREADS_DB_STATEMENT_TIMEOUT_S": "nan"}, "KVTHREADS_DB_STATEMENT_TIMEOUT_S"),
    ],
)
def test_malformed_values_fail_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_settings(env)


def test_unknown_kvthreads_variable_is_a_typo_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean KVTHREADS_PORT instead of KVTHREADS_PROT"):
        load_settings({"KVTHREADS_PROT": "9000"})
    with pytest.raises(ConfigError, match=r"unknown setting KVTHREADS_ZZZ \(known: "):
        load_settings({"KVTHREADS_ZZZ": "1"})


def test_other_variables_are_ignored() -> None:
    settings = load_settings({"PATH": "/bin", "HOME": "/root"})
    assert dataclasses.replace(settings, secret="x") == dataclasses.replace(
        load_settings({}), secret="x"
    )


def test_values_are_parsed_and_typed(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text("")
    model = tmp_path / "model"
    model.mkdir()
    settings = load_settings(
        {
            "KVTHREADS_MODEL": str(model),
            "KVTHREADS_DEVICE": "CPU",
            "KVTHREADS_KV_CACHE_MB": "1_024",
            "KVTHREADS_RESIDENCY": "off",
            "KVTHREADS_CPU_KERNELS": "off",
            "KVTHREADS_PORT": "9001",
            "KVTHREADS_PRICES": str(prices),
            "KVTHREADS_SECRET": "s" * 20,
            "KVTHREADS_DATA_DIR": str(tmp_path / "data"),
            "KVTHREADS_MONTHLY_SPEND_BUDGET": "12.50",
            "KVTHREADS_MONTHLY_TOKEN_BUDGET": "1_000_000",
            "KVTHREADS_DB_STATEMENT_TIMEOUT_S": "2.5",
        }
    )
    assert settings.monthly_spend_budget == Decimal("12.50")
    assert settings.monthly_token_budget == 1_000_000
    assert settings.db_statement_timeout_s == 2.5
    assert settings.model == str(model)
    assert not settings.is_builtin_model
    assert settings.device == "cpu"
    assert settings.kv_cache_mb == 1024
    assert settings.residency is False
    assert settings.cpu_kernels is False
    assert settings.port == 9001
    assert settings.prices == prices
    assert settings.secret == "s" * 20
    assert settings.data_dir == tmp_path / "data"
    assert "KVTHREADS_SECRET" in settings.from_environment


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)

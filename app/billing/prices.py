"""Unit prices per model, per million tokens, as exact decimals.

Prices come from one place: a TOML file named by KVTHREADS_PRICES, or the defaults below.

    [default]                       # any model without its own entry
    fresh_input = "0.50"
    cached_input = "0"
    output = "1.50"

    [models."builtin-tiny-random"]
    fresh_input = "0.10"
    cached_input = "0"
    output = "0.30"

Values are strings or numbers; they are read as Decimal (never float) and may carry at most
MAX_PRICE_PLACES decimal places, so that a turn's cost, tokens x price / 1e6, is exact in the
ledger's numeric(20, 10) column.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

MAX_PRICE_PLACES = 4
PER_TOKENS = Decimal(1_000_000)
PRICE_FIELDS = ("fresh_input", "cached_input", "output")

logger = logging.getLogger(__name__)


class PriceError(ValueError):
    pass


@dataclass(frozen=True)
class UnitPrices:
    """Prices per million tokens."""

    fresh_input: Decimal
    cached_input: Decimal
    output: Decimal

    def cost(self, *, cached_tokens: int, fresh_tokens: int, output_tokens: int) -> Decimal:
        return (
            cached_tokens * self.cached_input
            + fresh_tokens * self.fresh_input
            + output_tokens * self.output
        ) / PER_TOKENS

    def cost_without_cache(self, *, input_tokens: int, output_tokens: int) -> Decimal:
        """What the turn would cost if every input token were computed (and billed) fresh."""
        return (input_tokens * self.fresh_input + output_tokens * self.output) / PER_TOKENS


DEFAULT_PRICES = UnitPrices(
    fresh_input=Decimal("0.50"), cached_input=Decimal("0"), output=Decimal("1.50")
)


@dataclass(frozen=True)
class PriceBook:
    default: UnitPrices
    models: dict[str, UnitPrices]

    def for_model(self, model: str) -> UnitPrices:
        return self.models.get(model, self.default)


def _price(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise PriceError(f"{where}: expected a decimal number, got {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise PriceError(f"{where}: {value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0:
        raise PriceError(f"{where}: a price must be a finite number >= 0, got {value!r}")
    exponent = price.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_PRICE_PLACES:
        raise PriceError(f"{where}: at most {MAX_PRICE_PLACES} decimal places, got {value!r}")
    return price


def _unit_prices(table: object, where: str, fallback: UnitPrices) -> UnitPrices:
    if not isinstance(table, dict):
        raise PriceError(f"{where}: expected a table")
    unknown = set(table) - set(PRICE_FIELDS)
    if unknown:
        raise PriceError(f"{where}: unknown keys {sorted(unknown)} (known: {list(PRICE_FIELDS)})")
    values = {
        name: _price(table[name], f"{where}.{name}") if name in table else getattr(fallback, name)
        for name in PRICE_FIELDS
    }
    return UnitPrices(**values)


def parse_price_book(text: str, source: str = "prices") -> PriceBook:
    try:
        # Decimal for floats too, so 0.1 stays 0.1.
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"default", "models"}
    if unknown:
        raise PriceError(f"{source}: unknown sections {sorted(unknown)} (known: default, models)")
    default = _unit_prices(data.get("default", {}), f"{source}: default", DEFAULT_PRICES)
    models_table = data.get("models", {})
    if not isinstance(models_table, dict):
        raise PriceError(f"{source}: [models] must be a table of tables")
    models = {
        name: _unit_prices(table, f"{source}: models.{name}", default)
        for name, table in models_table.items()
    }
    return PriceBook(default=default, models=models)


def load_price_book(path: str | Path | None) -> PriceBook:
    """The prices in force: the file at `path`, or the defaults when no file is configured."""
    if path is None:
        return PriceBook(default=DEFAULT_PRICES, models={})
    return parse_price_book(_read(Path(path)), str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise PriceError(f"cannot read prices file {path}: {exc.strerror}") from None


class PriceSource:
    """The prices in force now, for a long-running server: the file is read again on every call,
    so an operator's edit applies from the next turn without a restart (old turns keep the prices
    stored on their ledger rows). The text is compared, not the mtime, whose granularity can hide
    two quick edits; parsing happens only when the text changed.

    A file that turns bad while the server runs (a half-saved edit, a typo) does not stop billing:
    the last good prices stay in force and `error` says why. The first load must succeed.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.error: PriceError | None = None
        self._text: str | None = None
        self._book = PriceBook(default=DEFAULT_PRICES, models={})
        if self.path is not None:
            self._text = _read(self.path)
            self._book = parse_price_book(self._text, str(self.path))

    def current(self) -> PriceBook:
        if self.path is None:
            return self._book
        try:
            text = _read(self.path)
        except PriceError as exc:
            self._keep_last_good(exc)
            return self._book
        if text == self._text:
            self.error = None
            return self._book
        try:
            book = parse_price_book(text, str(self.path))
        except PriceError as exc:
            self._keep_last_good(exc)
            return self._book
        self._book, self._text, self.error = book, text, None
        logger.info("prices reloaded from %s", self.path)
        return book

    def _keep_last_good(self, error: PriceError) -> None:
        if str(error) != str(self.error):  # once per new problem, not once per turn
            logger.error("%s; the last good prices stay in force", error)
        self.error = error

    def for_model(self, model: str) -> UnitPrices:
        return self.current().for_model(model)

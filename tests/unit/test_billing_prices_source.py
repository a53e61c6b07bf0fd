"""PriceSource: an edited prices file applies from the next call; a broken edit keeps the old one."""

from decimal import Decimal

import pytest

from app.billing.prices import DEFAULT_PRICES, PriceError, PriceSource

TINY = "builtin-tiny-random"


def _write(path, fresh: str) -> None:
    path.write_text(f'[models."{TINY}"]\nfresh_input = "{fresh}"\n')


def test_without_a_file_the_defaults_are_in_force():
    assert PriceSource(None).for_model(TINY) == DEFAULT_PRICES


def test_an_edit_applies_from_the_next_call(tmp_path):
    path = tmp_path / "prices.toml"
    _write(path, "0.10")
    source = PriceSource(path)
    assert source.for_model(TINY).fresh_input == Decimal("0.10")
    # Same length, written at once: an mtime check with coarse granularity could miss it.
    _write(path, "0.20")
    assert source.for_model(TINY).fresh_input == Decimal("0.20")
    assert source.for_model("other").fresh_input == DEFAULT_PRICES.fresh_input


def test_a_broken_edit_keeps_the_last_good_prices_and_says_why(tmp_path):
    path = tmp_path / "prices.toml"
    _write(path, "0.10")
    source = PriceSource(path)
    path.write_text('[models."x"]\nfresh_input = "-1"\n')
    assert source.for_model(TINY).fresh_input == Decimal("0.10")
    assert source.error is not None and ">= 0" in str(source.error)
    path.unlink()
    assert source.for_model(TINY).fresh_input == Decimal("0.10")
    assert "cannot read" in str(source.error)
    _write(path, "0.30")
    assert source.for_model(TINY).fresh_input == Decimal("0.30")
    assert source.error is None


def test_a_bad_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text("[default]\noutput = 0.00001\n")
    with pytest.raises(PriceError, match="decimal places"):
        PriceSource(path)
    with pytest.raises(PriceError, match="cannot read"):
        PriceSource(tmp_path / "missing.toml")

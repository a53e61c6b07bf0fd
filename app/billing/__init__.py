"""Prices, the usage ledger's reports (JSON, CSV) and the billing page's templates."""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

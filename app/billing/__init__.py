"""Billing: prices, the ledger row each turn writes, the ledger's reports (JSON, CSV), the response
structs and the billing page's templates.

    prices.py    PriceSource / PriceBook / UnitPrices: per-model prices from TOML or the defaults
    ledger.py    usage_row(...): one turn's ledger row, priced
    report.py    build_report(...): an account's sums by day, thread or model
    export.py    report_body / report_csv / money: the report as JSON body, CSV, decimal strings
    schemas.py   the report API's response structs
"""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

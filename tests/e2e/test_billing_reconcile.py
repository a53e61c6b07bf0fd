"""The ledger reconciles with what the API told the client, through real HTTP turns.

For several threads and turns, the sums of the per-response `usage` equal the report's totals,
token for token and cent for cent; every grouping adds up to the totals; a price change between
two turns leaves the earlier turns at their old prices; one account never sees another's turns.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from app.billing.prices import UnitPrices
from tests.e2e.fake_engine import fake_runtime

TOKEN_FIELDS = ("input_tokens", "cached_tokens", "fresh_tokens", "output_tokens")
OLD = UnitPrices(Decimal("0.8"), Decimal("0.05"), Decimal("2.4"))
NEW = UnitPrices(Decimal("1.7"), Decimal("0.1"), Decimal("3.3"))


def _prices_toml(p: UnitPrices) -> str:
    return (
        f'[default]\nfresh_input = "{p.fresh_input}"\ncached_input = "{p.cached_input}"\n'
        f'output = "{p.output}"\n'
    )


def _range() -> str:
    # The turns happen now; a day either side keeps a run across UTC midnight in range.
    today = datetime.now(UTC).date()
    return f"start={today - timedelta(1)}&end={today + timedelta(1)}"


METRICS_TOKEN = "scrape-token-0123456789"  # /metrics shows the ledger's totals only with it


@pytest.fixture
def prices_file(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(_prices_toml(OLD))
    return path


@pytest.fixture
async def client(open_api, prices_file):
    """The app with the real engine on the built-in model (loaded once for the test)."""
    return await open_api(prices=prices_file, metrics_token=METRICS_TOKEN)


@pytest.fixture
async def fake_client(open_api, fake_engine, prices_file):
    """The app on the fake engine: enough where only the prices matter, and no model to load."""
    return await open_api(fake_runtime(fake_engine), prices=prices_file)


class Caller:
    """One account's view of the shared app: every request carries its bearer key."""

    def __init__(self, client, key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}

    async def get(self, url: str):
        return await self.client.get(url, headers=self.headers)

    async def post(self, url: str, json: dict):
        return await self.client.post(url, json=json, headers=self.headers)


async def _turn(client, thread_id: str, content: str) -> dict:
    r = await client.post(
        f"/v1/threads/{thread_id}/messages", json={"content": content, "max_tokens": 8}
    )
    assert r.status_code == 200, r.text
    return r.json()


async def _thread(client) -> str:
    r = await client.post("/v1/threads", json={"system": "You keep accounts."})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _sum(usages: list[dict]) -> dict:
    sums = {f: sum(u[f] for u in usages) for f in TOKEN_FIELDS}
    sums["cost"] = sum((Decimal(u["cost"]) for u in usages), Decimal(0))
    return sums


def _report_sums(sums: dict) -> dict:
    return {**{f: sums[f] for f in TOKEN_FIELDS}, "cost": Decimal(sums["cost"])}


async def test_report_totals_equal_the_sum_of_the_responses(client, new_key):
    alice = Caller(client, await new_key("alice"))
    bob = Caller(client, await new_key("bob"))
    usages: dict[str, list[dict]] = defaultdict(list)  # thread -> usage of each of its turns
    for t in range(3):
        thread = await _thread(alice)
        for k in range(3 + t):
            usages[thread].append(
                (await _turn(alice, thread, f"entry {t}.{k}: {'x' * k}"))["usage"]
            )
    bob_thread = await _thread(bob)
    bob_usage = [(await _turn(bob, bob_thread, f"bob {k}"))["usage"] for k in range(2)]
    everything = [u for turns in usages.values() for u in turns]
    assert any(u["cached_tokens"] for u in everything)  # the cache served some history

    for group_by in ("day", "thread", "model"):
        r = await alice.get(f"/v1/billing/report?{_range()}&group_by={group_by}")
        assert r.status_code == 200, r.text
        report = r.json()
        totals = report["totals"]
        assert totals["turns"] == len(everything)
        assert _report_sums(totals) == _sum(everything), group_by
        assert _sum([_report_sums(row) for row in report["rows"]]) == _sum(everything), group_by
        assert sum(row["turns"] for row in report["rows"]) == len(everything)
        if group_by == "thread":
            assert {row["key"]: _report_sums(row) for row in report["rows"]} == {
                thread: _sum(turns) for thread, turns in usages.items()
            }

    bobs = (await bob.get(f"/v1/billing/report?{_range()}&group_by=thread")).json()
    assert [row["key"] for row in bobs["rows"]] == [bob_thread]
    assert _report_sums(bobs["totals"]) == _sum(bob_usage)

    # /metrics: the ledger over all accounts, and this process's cache counters, agree too.
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200
    metrics = _samples(r.text)
    all_turns = everything + bob_usage
    assert metrics['kvthreads_turn_ttft_seconds_bucket{le="+Inf"}'] == len(all_turns)
    assert metrics["kvthreads_turn_input_tokens_sum"] == _sum(all_turns)["input_tokens"]
    assert metrics["kvthreads_turn_output_tokens_sum"] == _sum(all_turns)["output_tokens"]
    model = (await alice.get(f"/v1/billing/report?{_range()}&group_by=model")).json()["rows"][0][
        "key"
    ]
    assert metrics[f'kvthreads_ledger_turns_total{{model="{model}"}}'] == len(all_turns)
    for kind in ("cached", "fresh", "output"):
        sample = f'kvthreads_ledger_tokens_total{{model="{model}",kind="{kind}"}}'
        assert metrics[sample] == _sum(all_turns)[f"{kind}_tokens"]
    assert metrics["kvthreads_kv_cached_tokens_total"] == _sum(all_turns)["cached_tokens"]
    assert metrics['kvthreads_kv_misses_total{reason="new_thread"}'] == len(usages) + 1
    assert metrics["kvthreads_kv_hits_total"] == len(all_turns) - len(usages) - 1
    assert metrics["kvthreads_kv_resident_threads"] == len(usages) + 1
    assert metrics["kvthreads_kv_evictions_total"] == 0


def _samples(exposition: str) -> dict[str, float]:
    """{'name{labels}': value} from Prometheus text, checking each family is declared first."""
    declared, samples = set(), {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{")[0]
            family = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert name in declared or family in declared, line
            samples[name_labels] = float(value)
    return samples


async def test_a_price_change_between_turns_keeps_old_turns_at_old_prices(
    fake_client, prices_file, new_key
):
    carol = Caller(fake_client, await new_key("carol"))
    early = await _thread(carol)
    first = (await _turn(carol, early, "the first turn"))["usage"]
    prices_file.write_text(_prices_toml(NEW))  # the operator edits the price file; no restart
    second = (await _turn(carol, early, "the second turn"))["usage"]
    late = await _thread(carol)
    third = (await _turn(carol, late, "a turn on a new thread"))["usage"]

    def billed(prices: UnitPrices, u: dict) -> tuple[Decimal, Decimal]:
        return (
            prices.cost(cached_tokens=u["cached_tokens"], fresh_tokens=u["fresh_tokens"],
                        output_tokens=u["output_tokens"]),
            prices.cost_without_cache(input_tokens=u["input_tokens"],
                                      output_tokens=u["output_tokens"]),
        )  # fmt: skip

    turns = [billed(OLD, first), billed(NEW, second), billed(NEW, third)]
    assert [Decimal(u["cost"]) for u in (first, second, third)] == [cost for cost, _ in turns]

    report = (await carol.get(f"/v1/billing/report?{_range()}&group_by=thread")).json()
    rows = {row["key"]: row for row in report["rows"]}
    assert Decimal(rows[early]["cost"]) == turns[0][0] + turns[1][0]
    assert Decimal(rows[early]["cost_without_cache"]) == turns[0][1] + turns[1][1]
    assert Decimal(rows[late]["cost_without_cache"]) == turns[2][1]
    totals = report["totals"]
    assert Decimal(totals["cost"]) == sum(cost for cost, _ in turns)
    assert Decimal(totals["cost_without_cache"]) == sum(without for _, without in turns)
    assert Decimal(totals["saved"]) == Decimal(totals["cost_without_cache"]) - Decimal(
        totals["cost"]
    )
    # Priced now, the first turn would cost more: the report did not reprice it.
    assert billed(NEW, first)[0] != turns[0][0]

"""The KV hierarchy at engine level: device -> host -> disk and back, exact, within budgets.

Every engine here checks the block and tier accounting after every step (check_invariants).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_testing import LogitsLog, random_ids, random_model, run_to_finish

from app.engine.network.kv_pool import bytes_per_block
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import MissReason, SamplingParams

ATOL = 1e-5
BLOCK_SIZE = 4
# The device of the module's model. On a GPU machine, KVTHREADS_TEST_DEVICE=cuda runs these tests
# through the CUDA-only tier path (pinned host buffers, the side stream that copies blocks):
# `python3 -m pytest --noconftest tests/engine/test_engine_tiers.py` (no web packages needed).
DEVICE = os.environ.get("KVTHREADS_TEST_DEVICE", "cpu")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=2).to(DEVICE)


def mb(model, num_blocks: int, block_size: int = BLOCK_SIZE) -> float:
    """The MB budget that holds exactly num_blocks blocks."""
    return num_blocks * bytes_per_block(model.config, block_size, torch.float32) / 2**20


def make_engine(model, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 16)
    kwargs.setdefault("block_size", BLOCK_SIZE)
    return LLMEngine(model, check_invariants=True, **kwargs)


def disk_engine(model, folder: Path, **kwargs) -> LLMEngine:
    kwargs.setdefault("disk_cache_mb", mb(model, 256, kwargs.get("block_size", BLOCK_SIZE)))
    return make_engine(model, disk_cache_dir=folder, **kwargs)


def turn(engine, key, history, new, n=5, *, first=False, log=None, scope=None):
    """One committed turn; returns (event, the logits rows it sampled from)."""
    seq_id = engine.add_request(key, history, new, greedy(n), first_turn=first, share_scope=scope)
    (event,) = run_to_finish(engine).values()
    engine.commit_turn(key)
    return event, (log.rows.get(seq_id) if log is not None else None)


def reference(model, prompt, n=5):
    log = LogitsLog()
    engine = make_engine(model, num_blocks=128, residency=False, on_logits=log)
    seq_id = engine.add_request("ref", [], prompt, greedy(n), first_turn=True)
    (event,) = run_to_finish(engine).values()
    return event, log.rows[seq_id]


def assert_rows_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def evict_with_another_thread(engine, key="big", n_new=45):
    """A thread big enough to push every other unpinned thread out of the 16-block pool."""
    event, _ = turn(engine, key, [], random_ids(n_new, seed=99), first=True)
    return event


def conversation(engine, log, *, evict: bool):
    """Thread `a`: one turn, (evicted), a second turn. Returns both turns' events and rows."""
    first_new, second_new = random_ids(13, seed=1), random_ids(7, seed=2)
    e1, _ = turn(engine, "a", [], first_new, first=True, log=log)
    history = first_new + e1.token_ids
    if evict:
        evict_with_another_thread(engine)
        assert engine.thread_state("a").resident is False
    e2, rows = turn(engine, "a", history, second_new, log=log)
    return history, second_new, e2, rows


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_turn_restored_from_host_or_disk_equals_device_and_recompute(model, tmp_path, tier):
    log = LogitsLog()
    if tier == "host":
        engine = make_engine(model, on_logits=log, host_cache_mb=mb(model, 64))
    else:
        engine = disk_engine(model, tmp_path, on_logits=log)
    history, new, event, rows = conversation(engine, log, evict=True)
    counts = event.counts
    assert counts.cache_tier == tier
    assert counts.miss_reason is None
    assert counts.cached_tokens == len(history) - 1  # all the KV the first turn left
    assert counts.computed_tokens == len(new) + 1

    device_log = LogitsLog()
    device = make_engine(model, num_blocks=128, on_logits=device_log)
    _, _, device_event, device_rows = conversation(device, device_log, evict=False)
    assert device_event.counts.cache_tier == "device"
    want, want_rows = reference(model, history + new)
    assert event.token_ids == device_event.token_ids == want.token_ids
    assert_rows_close(rows, device_rows)
    assert_rows_close(rows, want_rows)
    stats = engine.tier_stats()
    assert stats.hits[tier] == 1 and stats.restores[tier] == 1
    assert stats.tiers[tier].threads == 1  # the big thread, pushed down by `a`'s restore


def test_host_evicts_to_disk_and_the_disk_turn_is_exact(model, tmp_path):
    log = LogitsLog()
    # Host holds 6 blocks: `a` (5 blocks) goes there, then the big thread pushes it to disk.
    engine = disk_engine(model, tmp_path, on_logits=log, host_cache_mb=mb(model, 6))
    first_new = random_ids(13, seed=1)
    e1, _ = turn(engine, "a", [], first_new, first=True, log=log)
    history = first_new + e1.token_ids
    evict_with_another_thread(engine, "b")
    assert engine.thread_state("a").tier == "host"
    evict_with_another_thread(engine, "c")  # b to host (12 blocks > 6: straight to disk)
    evict_with_another_thread(engine, "d")
    states = {k: engine.thread_state(k).tier for k in "abcd"}
    assert states["d"] == "device" and "disk" in states.values()
    where_a = states["a"]
    new = random_ids(7, seed=2)
    e2, rows = turn(engine, "a", history, new, log=log)
    assert e2.counts.cache_tier == where_a and e2.counts.miss_reason is None
    want, want_rows = reference(model, history + new)
    assert e2.token_ids == want.token_ids
    assert_rows_close(rows, want_rows)


def test_past_the_last_tier_a_thread_recomputes_and_says_evicted(model):
    engine = make_engine(model, host_cache_mb=mb(model, 5))  # no disk tier
    first_new = random_ids(13, seed=1)
    e1, _ = turn(engine, "a", [], first_new, first=True)  # 17 tokens: 5 blocks
    evict_with_another_thread(engine, "b")  # a -> host (exactly its budget)
    assert engine.thread_state("a").tier == "host"
    turn(engine, "x", [], random_ids(13, seed=5), first=True)  # b: 13 blocks, never fits: gone
    assert engine.thread_state("b").tier is None
    evict_with_another_thread(engine, "c")  # x -> host, pushing a out of the last tier
    assert (engine.thread_state("a").tier, engine.thread_state("x").tier) == (None, "host")
    e2, _ = turn(engine, "a", first_new + e1.token_ids, random_ids(7, seed=2))
    assert e2.counts.miss_reason is MissReason.EVICTED
    assert (e2.counts.cached_tokens, e2.counts.cache_tier) == (0, None)
    stats = engine.tier_stats()
    assert stats.evictions["host"] == 1
    assert stats.tiers["host"].blocks <= 5


def test_shared_blocks_move_down_once(model):
    engine = make_engine(model, host_cache_mb=mb(model, 64))
    prefix = random_ids(16, seed=7)  # 4 full blocks
    turn(engine, "a", [], prefix + [1, 2], 1, first=True, scope="acct")
    turn(engine, "b", [], prefix + [3, 4, 5], 1, first=True, scope="acct")
    assert engine.stats().num_shared_blocks == 4
    evict_with_another_thread(engine, "big", 50)
    stats = engine.tier_stats()
    assert {engine.thread_state(k).tier for k in "ab"} == {"host"}
    # a holds 18 tokens (5 blocks), b 19 (5 blocks); 4 of them are the same: 6 stored, 6 copied.
    assert stats.tiers["host"].blocks == 6
    assert stats.offload_bytes["host"] == 6 * engine.tiers.block_bytes
    # Back up: b's restore shares the blocks a's restore brought back (found by hash).
    e, _ = turn(engine, "a", prefix + [1, 2], [9], 1, scope="acct")
    assert e.counts.cache_tier == "host"
    before = engine.tier_stats().restore_bytes["host"]
    e, _ = turn(engine, "b", prefix + [3, 4, 5], [9], 1, scope="acct")
    assert e.counts.cache_tier == "host" and e.counts.shared_tokens == 16
    # Only b's private last block was copied; its 4 shared blocks are a's, already up.
    assert engine.tier_stats().restore_bytes["host"] - before == engine.tiers.block_bytes


def test_many_threads_small_tiers_replies_equal_a_large_pool_and_budgets_hold(model, tmp_path):
    host_blocks, disk_blocks = 10, 24
    tiers = disk_engine(
        model,
        tmp_path,
        host_cache_mb=mb(model, host_blocks),
        disk_cache_mb=mb(model, disk_blocks),
    )
    large = make_engine(model, num_blocks=256)
    histories = {k: [] for k in range(8)}
    for round_ in range(3):
        for k in histories:
            new = random_ids(5 + k, seed=100 * round_ + k)
            key = f"t{k}"
            got, _ = turn(tiers, key, histories[k], new, 3, first=round_ == 0)
            want, _ = turn(large, key, histories[k], new, 3, first=round_ == 0)
            assert got.token_ids == want.token_ids
            histories[k] = histories[k] + new + got.token_ids
            stats = tiers.tier_stats()
            assert stats.tiers["host"].blocks <= host_blocks
            assert stats.tiers["disk"].blocks <= disk_blocks
    stats = tiers.tier_stats()
    assert stats.hits["host"] + stats.hits["disk"] > 0
    tiers.tiers.store.flush()
    on_disk = list((tmp_path / "blocks").iterdir())
    assert len(on_disk) == stats.tiers["disk"].blocks


# ---- snapshots across restarts --------------------------------------------------------------


def two_turns_then_persist(model, folder, **kwargs):
    engine = disk_engine(model, folder, **kwargs)
    first_new = random_ids(13, seed=1)
    e1, _ = turn(engine, "a", [], first_new, first=True)
    second_new = random_ids(6, seed=3)
    history = first_new + e1.token_ids
    e2, _ = turn(engine, "a", history, second_new)
    history = history + second_new + e2.token_ids
    assert engine.persist()
    return history


def test_after_a_restart_the_first_turn_restores_from_disk_exactly(model, tmp_path):
    history = two_turns_then_persist(model, tmp_path)
    log = LogitsLog()
    engine = disk_engine(model, tmp_path, on_logits=log)
    assert engine.thread_state("a").tier == "disk"
    new = random_ids(7, seed=2)
    event, rows = turn(engine, "a", history, new, log=log)
    assert event.counts.cache_tier == "disk" and event.counts.miss_reason is None
    assert event.counts.cached_tokens == len(history) - 1
    want, want_rows = reference(model, history + new)
    assert event.token_ids == want.token_ids
    assert_rows_close(rows, want_rows)
    engine.tiers.store.flush()
    assert list((tmp_path / "threads").iterdir()) == []  # moved up: the snapshot is gone


def first_file(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def truncate_block(folder: Path):
    path = first_file(folder / "blocks")
    path.write_bytes(path.read_bytes()[:-40])


def flip_a_byte(folder: Path):
    path = first_file(folder / "blocks")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate_snapshot(folder: Path):
    path = first_file(folder / "threads")
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_model", "model"),
        ("truncated_block", "truncated"),
        ("truncated_snapshot", "truncated"),
        ("corrupted_byte", "corrupt"),
        ("token_mismatch", "tokens"),
        ("other_block_size", "block_size"),
    ],
)
def test_an_invalid_snapshot_is_refused_deleted_and_recomputed(model, tmp_path, case, reason):
    history = two_turns_then_persist(model, tmp_path)
    serving, block_size = model, BLOCK_SIZE
    if case == "other_model":
        serving = random_model(seed=3)
    elif case == "truncated_block":
        truncate_block(tmp_path)
    elif case == "truncated_snapshot":
        truncate_snapshot(tmp_path)
    elif case == "corrupted_byte":
        flip_a_byte(tmp_path)
    elif case == "token_mismatch":
        history = [(history[0] + 1) % 101, *history[1:]]
    elif case == "other_block_size":
        block_size = 8
    engine = disk_engine(serving, tmp_path, block_size=block_size, num_blocks=16)
    new = random_ids(7, seed=2)
    event, _ = turn(engine, "a", history, new)
    assert event.counts.miss_reason is MissReason.SNAPSHOT_INVALID
    assert event.counts.cached_tokens == 0 and event.counts.cache_tier is None
    assert engine.tier_stats().snapshots_refused == {reason: 1}
    assert engine.stats().misses["snapshot_invalid"] == 1
    want, _ = reference(serving, history + new)
    assert event.token_ids == want.token_ids  # recomputed, never the refused KV
    engine.tiers.store.flush()
    assert list((tmp_path / "threads").iterdir()) == []
    if case in ("truncated_block", "corrupted_byte"):
        assert list((tmp_path / "blocks").iterdir()) == []


def test_deleting_a_thread_deletes_its_kv_in_every_tier(model, tmp_path):
    engine = disk_engine(model, tmp_path, host_cache_mb=mb(model, 6))
    for key, n in (("a", 13), ("b", 13), ("c", 33), ("d", 45)):
        turn(engine, key, [], random_ids(n, seed=n), first=True)
    tiers = {k: engine.thread_state(k).tier for k in "abcd"}
    assert tiers == {"a": "disk", "b": "host", "c": "disk", "d": "device"}
    for key in "abcd":
        engine.forget_thread(key)
        assert engine.thread_state(key).tier is None
    engine.tiers.store.flush()
    assert list((tmp_path / "threads").iterdir()) == []
    assert list((tmp_path / "blocks").iterdir()) == []
    stats = engine.tier_stats()
    assert all(stats.tiers[t].blocks == 0 for t in ("host", "disk"))


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    from engine_testing import random_ids, random_model
    from app.engine.runtime.llm_engine import LLMEngine
    from app.engine.runtime.types import SamplingParams
    from engine_testing import run_to_finish

    engine = LLMEngine(random_model(seed=2), num_blocks=64, block_size=4,
                       disk_cache_dir={folder!r}, disk_cache_mb=1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request("done", [], random_ids(30, seed=1), params, first_turn=True)
    run_to_finish(engine, commit=True)
    engine.persist()  # one complete snapshot, then a slow one that gets killed
    engine = LLMEngine(random_model(seed=2), num_blocks=64, block_size=4,
                       disk_cache_dir={folder!r}, disk_cache_mb=1)
    engine.add_request("killed", [], random_ids(40, seed=2), params, first_turn=True)
    run_to_finish(engine, commit=True)
    real_fsync = os.fsync
    def slow_fsync(fd):
        print("writing", flush=True)
        time.sleep(0.3)
        real_fsync(fd)
    os.fsync = slow_fsync
    engine.persist()
    print("finished", flush=True)
    """
)


def test_a_writer_killed_mid_snapshot_leaves_nothing_read_as_valid(model, tmp_path):
    folder = tmp_path / "kv"
    script = KILLED_WRITER.format(
        tests=str(Path(__file__).parent), root=os.getcwd(), folder=str(folder)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert proc.stdout is not None
        for _ in range(4):  # a few files into the slow snapshot
            line = proc.stdout.readline()
            assert line.strip() == "writing", line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(".tmp" in p.name for p in (folder / "blocks").iterdir())  # killed mid-write
    assert not (folder / "threads" / (b"killed".hex() + ".snap")).exists()
    engine = disk_engine(model, folder, num_blocks=64)
    assert not any(".tmp" in p.name for d in ("blocks", "threads") for p in (folder / d).iterdir())
    assert engine.thread_state("killed").tier is None
    assert engine.thread_state("done").tier == "disk"
    prompt = random_ids(30, seed=1)
    first = reference(model, prompt, 2)[0]
    history = prompt + first.token_ids
    event, _ = turn(engine, "done", history, [5, 6])
    assert event.counts.cache_tier == "disk" and event.counts.miss_reason is None
    event, _ = turn(engine, "killed", random_ids(40, seed=2) + [1, 2], [5, 6])
    assert event.counts.miss_reason is MissReason.RESTARTED

"""Thousands of random operations on the KV cache manager against a reference model.

The test plays the engine: it "computes" KV by writing, into a simulated pool, a value that
names the token and everything before it (what real KV depends on), copies blocks when the
manager asks, and checks after every operation that

- every thread's held ids are a prefix of its log, and reading its KV through its block table
  gives exactly the values of those ids (so sharing, fork, rewind and copy-on-write are exact);
- writes only ever land in blocks that their thread holds alone and that have no name;
- reference counts equal the holders the reference model counts, the free count is the rest;
- threads of different accounts never hold the same block.

A new thread's first turn may start from another thread's partial block (copied at admission):
the KV check above proves the copy holds exactly the ids the thread keeps.
"""

import random

import pytest

from app.kvcache import KVCacheManager

BLOCK_SIZE = 4
NUM_BLOCKS = 40
SYSTEMS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 11, 12], [20, 21, 22]]


class Engine:
    """The manager, a simulated KV pool and the reference: each thread's log and account."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> kv value
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, identity=b"m", copy_block=self.copy_block)
        self.logs: dict[str, list[int]] = {}
        self.accounts: dict[str, str] = {}
        self.next_id = 0
        self.partial_copies = 0  # turns that began with another thread's partial block copied

    def copy_block(self, src: int, dst: int) -> None:
        for offset in range(BLOCK_SIZE):
            if (src, offset) in self.slots:
                self.slots[(dst, offset)] = self.slots[(src, offset)]
            else:
                self.slots.pop((dst, offset), None)

    @staticmethod
    def value(ids: list[int], pos: int) -> tuple:
        return (pos, hash(tuple(ids[: pos + 1])))  # KV depends on the token and its prefix

    def write(self, key: str, table: list[int], ids: list[int], start: int, end: int) -> None:
        for pos in range(start, end):
            block = table[pos // BLOCK_SIZE]
            assert self.kv.pool.is_private(block), f"write into shared block {block}"
            self.slots[(block, pos % BLOCK_SIZE)] = self.value(ids, pos)

    def check(self) -> None:
        kv = self.kv
        kv.check_integrity()
        holders = [0] * NUM_BLOCKS
        block_account: dict[int, str] = {}
        for key, log in self.logs.items():
            entry = kv._threads.get(key)
            if entry is None:
                continue
            held = entry.token_ids
            assert held == log[: len(held)], f"{key} holds ids its log does not have"
            for pos in range(len(held)):
                block = entry.block_table[pos // BLOCK_SIZE]
                assert self.slots.get((block, pos % BLOCK_SIZE)) == self.value(log, pos)
            for block in entry.block_table:
                holders[block] += 1
                assert (
                    block_account.setdefault(block, self.accounts[key]) == (self.accounts[key])
                ), f"block {block} shared across accounts"
        assert [kv.pool.ref_count(b) for b in range(NUM_BLOCKS)] == holders
        assert kv.pool.num_free == sum(1 for h in holders if h == 0)

    # ---- operations ----------------------------------------------------------------------

    def new_thread(self) -> None:
        key = f"t{self.next_id}"
        self.next_id += 1
        self.logs[key] = list(self.rng.choice(SYSTEMS))
        self.accounts[key] = self.rng.choice(["A", "B"])

    def turn(self, key: str) -> None:
        rng = self.rng
        log = self.logs[key]
        new = [rng.randrange(30, 40) for _ in range(rng.randrange(1, 7))]
        prompt = log + new
        kv = self.kv
        held = kv.thread_state(key).cached_tokens
        lookup = kv.begin_turn(key, prompt, first_turn=False, scope=self.accounts[key])
        table = lookup.block_table
        done = lookup.num_cached_tokens
        assert done < len(prompt)
        if done > held and done % BLOCK_SIZE:
            self.partial_copies += 1
        ids = list(prompt)
        target = len(prompt) + rng.randrange(0, 6)  # prompt, then decode steps
        while done < target:
            if rng.random() < 0.03:  # preempted: every block taken back, recompute
                kv.drop_blocks(key)
                done = 0
                self.check()
                continue
            # Prefill in chunks, then one token per decode step.
            n = 1 if done >= len(prompt) else min(len(prompt) - done, rng.randrange(1, 9))
            if not kv.ensure_blocks(key, done + n):
                kv.release(key, keep_tokens=0)  # no room: give up the turn
                self.check()
                return
            self.write(key, table, ids, done, done + n)
            done += n
            while len(ids) < done + 1:
                ids.append(rng.randrange(40, 50))  # sampled; its KV comes next step
            kv.note_progress(key, ids, done)
        kv.finish_turn(key, ids[:done])
        if rng.random() < 0.8:
            kv.release(key)
            kv.count_turn(lookup.miss_reason, lookup.num_cached_tokens, lookup.num_shared_tokens)
            log[:] = ids[: done + 1]  # prompt + generated (the last sampled id has no KV)
        else:
            kv.release(key, keep_tokens=len(log))  # rolled back

    def fork(self, parent: str) -> None:
        child = f"t{self.next_id}"
        self.next_id += 1
        log = self.logs[parent]
        self.logs[child] = log[: self.rng.randrange(1, len(log) + 1)]
        self.accounts[child] = self.accounts[parent]
        self.kv.fork(parent, child, self.logs[child])

    def rewind(self, key: str) -> None:
        log = self.logs[key]
        del log[self.rng.randrange(1, len(log) + 1) :]
        self.kv.truncate(key, log)

    def delete(self, key: str) -> None:
        self.kv.forget(key)
        del self.logs[key]


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_agree_with_the_reference(seed):
    rng = random.Random(seed)
    engine = Engine(rng)
    for _ in range(3):
        engine.new_thread()
    for _ in range(2500):
        keys = list(engine.logs)
        op = rng.random()
        if op < 0.1 or not keys:
            engine.new_thread()
        elif op < 0.6:
            engine.turn(rng.choice(keys))
        elif op < 0.75:
            engine.fork(rng.choice(keys))
        elif op < 0.87:
            engine.rewind(rng.choice(keys))
        elif op < 0.95 and len(keys) > 2:
            engine.delete(rng.choice(keys))
        else:  # evict: a big turn of a fresh thread pushes LRU threads out
            engine.new_thread()
            key = list(engine.logs)[-1]
            engine.logs[key] += [rng.randrange(30, 40) for _ in range(60)]
            engine.turn(key)
        engine.check()
    stats = engine.kv.stats()
    assert stats.evictions > 0 and stats.shared_tokens > 0 and stats.block_copies > 0
    assert engine.partial_copies > 0

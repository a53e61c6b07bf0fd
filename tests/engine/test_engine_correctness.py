"""Cached equals recomputed, batched equals alone, and the same greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch
from engine_testing import LogitsLog, random_ids, random_model, run_to_finish, tiny_config

from app.engine.network.model import CausalLM
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.scheduler import ScheduledBatch
from app.engine.runtime.sequence import Sequence
from app.engine.runtime.types import SamplingParams
from devtools.transformers_twin import transformers_twin

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return random_model(seed=1)


def make_engine(model, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 128)
    kwargs.setdefault("block_size", 4)
    return LLMEngine(model, check_invariants=True, **kwargs)


def all_rows_logits(engine: LLMEngine, seq: Sequence, num_new: int) -> torch.Tensor:
    """Run num_new tokens of seq on top of its cached ones; logits of every new row."""
    assert engine.kv.ensure_blocks(seq.thread_key, seq.num_cached_tokens + num_new)
    prepared = engine.runner.prepare(ScheduledBatch([seq], [num_new]))
    with torch.inference_mode():
        hidden = engine.runner.model(
            prepared.input_ids,
            prepared.positions,
            engine.pool.layer_caches,
            prepared.meta,
            engine.runner.attn,
        )
        logits = engine.runner.model.compute_logits(hidden)
    seq.num_cached_tokens += num_new
    return logits


def new_sequence(engine: LLMEngine, key: str, ids: list[int]) -> Sequence:
    lookup = engine.kv.begin_turn(key, ids, first_turn=True)
    return Sequence(
        0,
        key,
        ids,
        0,
        GREEDY,
        block_table=lookup.block_table,
        num_cached_tokens=0,
        miss_reason=lookup.miss_reason,
        decode=None,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("prefix_len", [8, 16, 11, 13, 1])  # block boundaries and mid-block
def test_every_row_extended_on_a_cached_prefix_equals_a_fresh_prefill(model, prefix_len):
    ids = random_ids(29, seed=prefix_len)
    engine = make_engine(model)
    fresh = all_rows_logits(engine, new_sequence(engine, "fresh", ids), len(ids))
    seq = new_sequence(engine, "cached", ids)
    all_rows_logits(engine, seq, prefix_len)
    extended = all_rows_logits(engine, seq, len(ids) - prefix_len)
    torch.testing.assert_close(extended, fresh[prefix_len:], atol=ATOL, rtol=0)
    engine.kv.check_integrity()


@pytest.mark.parametrize("prefix_len", [12, 9])  # block boundary, mid-block
def test_a_turn_on_resident_kv_equals_a_recomputation(model, prefix_len):
    ids = random_ids(26, seed=100 + prefix_len)
    log = LogitsLog()
    engine = make_engine(model, on_logits=log)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("t", [], ids[:prefix_len], one, first_turn=True)
    run_to_finish(engine)
    engine.commit_turn("t")  # resident: the prompt (the one sampled id has no KV)
    assert engine.thread_state("t").cached_tokens == prefix_len

    seq_id = engine.add_request("t", ids[:prefix_len], ids[prefix_len:], GREEDY, first_turn=False)
    (cached_turn,) = run_to_finish(engine).values()
    assert cached_turn.counts.cached_tokens == prefix_len
    assert cached_turn.counts.miss_reason is None

    ref_log = LogitsLog()
    reference = make_engine(model, residency=False, on_logits=ref_log)
    ref_id = reference.add_request("r", [], ids, GREEDY, first_turn=True)
    (recomputed,) = run_to_finish(reference).values()
    assert recomputed.counts.cached_tokens == 0
    assert cached_turn.token_ids == recomputed.token_ids
    for got, want in zip(log.rows[seq_id], ref_log.rows[ref_id], strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_batched_equals_alone_with_chunked_prefill_and_decodes_mixed(model):
    prompts = {
        "a": random_ids(23, seed=1),
        "b": random_ids(41, seed=2),
        "c": random_ids(5, seed=3),
        "d": random_ids(14, seed=4),
    }
    params = {
        "a": SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
        "b": SamplingParams(max_tokens=5, temperature=0.9, top_k=20, seed=11, ignore_eos=True),
        "c": SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
        "d": SamplingParams(max_tokens=6, temperature=1.2, top_p=0.8, seed=5, ignore_eos=True),
    }

    def run(keys, delays=0):
        log = LogitsLog()
        engine = make_engine(model, max_batch_tokens=16, max_num_seqs=4, on_logits=log)
        batches = []
        schedule = engine.scheduler.schedule

        def recording_schedule():
            batch = schedule()
            batches.append(list(batch.num_new_tokens))
            return batch

        engine.scheduler.schedule = recording_schedule
        ids = {}
        for key in keys:
            ids[key] = engine.add_request(key, [], prompts[key], params[key], first_turn=True)
        finished = run_to_finish(engine)
        return {k: (finished[i], log.rows[i]) for k, i in ids.items()}, batches

    batched, batches = run(["a", "b", "c", "d"])
    # The budget split prefills into chunks and mixed them with other sequences' decodes.
    assert any(1 in b and any(n > 1 for n in b) for b in batches)
    assert any(len(b) == 4 for b in batches)
    for key in prompts:
        (alone, _) = run([key])
        got_event, got_rows = batched[key]
        want_event, want_rows = alone[key]
        assert got_event.token_ids == want_event.token_ids, key
        for got, want in zip(got_rows, want_rows, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(model):
    pytest.importorskip("transformers")
    hf = transformers_twin(model)  # raises unless only transformers' rotary buffer is missing

    prompts = [random_ids(n, seed=200 + n) for n in (3, 17, 30)]
    max_new = 20
    engine = make_engine(model, max_batch_tokens=32)
    seq_ids = [
        engine.add_request(
            f"t{i}",
            [],
            p,
            SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True),
            first_turn=True,
        )
        for i, p in enumerate(prompts)
    ]
    finished = run_to_finish(engine)
    for seq_id, prompt in zip(seq_ids, prompts, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new,
            )
        assert finished[seq_id].token_ids == out[0, len(prompt) :].tolist()


def test_tied_embeddings_and_a_wider_gqa_group(model):
    """Another shape: tied lm_head, 8 query heads over 1 KV head, block size 16."""
    config = tiny_config(num_heads=8, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    other = random_model(config, seed=3)
    ids = random_ids(37, seed=9)
    log = LogitsLog()
    engine = LLMEngine(other, num_blocks=16, block_size=16, check_invariants=True, on_logits=log)
    engine.add_request("t", [], ids[:20], GREEDY, first_turn=True)
    run_to_finish(engine)
    engine.rollback_turn("t")
    engine.add_request("t", ids[:19], ids[19:20], GREEDY, first_turn=False)  # cache 19 tokens
    run_to_finish(engine)
    engine.commit_turn("t")
    seq_id = engine.add_request("t", ids[:20], ids[20:], GREEDY, first_turn=False)
    (event,) = run_to_finish(engine).values()
    assert event.counts.cached_tokens == 20
    ref_log = LogitsLog()
    ref = LLMEngine(other, num_blocks=16, block_size=16, residency=False, on_logits=ref_log)
    ref_id = ref.add_request("r", [], ids, GREEDY, first_turn=True)
    (want,) = run_to_finish(ref).values()
    assert event.token_ids == want.token_ids
    for got, exp in zip(log.rows[seq_id], ref_log.rows[ref_id], strict=True):
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)

"""Decode steps through the CPU library's fused layers (network/fused_decode.py) give the eager
forward's logits, step by step (float32, 1e-5): plain Llama, Qwen2's q/k/v biases, Qwen3's q/k
norms, grouped and plain attention, decode batches of changing sizes beside eager prefills. A
weight rewritten after packing sends steps the eager way (never stale), until packed again.
And the C code's inputs are checked before it reads them."""

from __future__ import annotations

import pytest
import torch

from app.engine.runtime.llm_engine import LLMEngine
from kernels.cpu_decode_attention import DecodeRows, StepWrites
from kernels.cpu_library import load_cpu_library
from tests.engine.engine_testing import count_fused, random_model, tiny_config
from tests.engine.engine_testing import play_changing_batches as play

pytestmark = pytest.mark.skipif(load_cpu_library() is None, reason="the CPU library did not build")


def engine_for(model, *, fused: bool) -> LLMEngine:
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3, check_invariants=True)
    if not fused:
        engine.runner.fused = None
    return engine


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_bias": True},  # Qwen2
        {"qk_norm": True},  # Qwen3
        {"num_kv_heads": 4, "head_dim": 32, "num_heads": 4},  # no grouping, another head size
    ],
    ids=["llama", "qkv-bias", "qk-norm", "mha-d32"],
)
def test_fused_decode_steps_give_the_eager_logits(overrides):
    model = random_model(tiny_config(**overrides))
    expected = play(engine_for(model, fused=False))
    engine = engine_for(model, fused=True)
    assert engine.runner.fused is not None
    runs = count_fused(engine)
    got = play(engine)
    assert sorted(set(runs)) == [1, 2, 3]  # every decode batch size of the play ran fused
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def rewrite_two_weights(model) -> None:
    """A norm and a linear, written in place: either alone must send steps the eager way."""
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)


def test_a_weight_rewritten_after_packing_is_never_served_stale():
    reference_model = random_model()
    reference = engine_for(reference_model, fused=False)
    play(reference)
    rewrite_two_weights(reference_model)
    expected = play(reference)  # the same threads' next turns, over the new weights
    expected_after = play(reference)

    model = random_model()
    engine = engine_for(model, fused=True)
    runs = count_fused(engine)
    play(engine)
    assert runs
    rewrite_two_weights(model)
    runs.clear()
    got = play(engine)
    assert runs == []  # stale: every step went the eager way, over the plain linears
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    assert model.prepack_linears()  # packed again: the structs are rebuilt, steps fused again
    got = play(engine)
    assert runs
    for g, e in zip(got, expected_after, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_the_step_is_checked_before_the_c_code_reads_it():
    model = random_model()
    engine = engine_for(model, fused=True)
    layers = engine.runner.fused._current_layers()
    mirror = [(torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16)) for _ in range(2)]
    num_slots = 64 * 4
    one = torch.tensor([0])
    writes = StepWrites(one, one, one, one, num_slots=num_slots, num_rows=2, capacity=8)
    ids, positions = torch.tensor([5]), torch.tensor([0])
    rows = DecodeRows([0], [1])
    with pytest.raises(ValueError, match="ids must be"):
        layers(torch.tensor([5], dtype=torch.int32), positions, rows, writes, mirror)
    with pytest.raises(ValueError, match="positions must be"):
        layers(ids, torch.tensor([0, 1]), rows, writes, mirror)
    with pytest.raises(ValueError, match="past the vocabulary of 101"):
        layers(torch.tensor([101]), positions, rows, writes, mirror)
    with pytest.raises(ValueError, match="past the rope tables' 512"):
        layers(ids, torch.tensor([512]), rows, writes, mirror)
    with pytest.raises(ValueError, match="2 sequences"):
        layers(ids, positions, DecodeRows([0, 1], [1, 1]), writes, mirror)
    with pytest.raises(ValueError, match="9 keys past"):
        layers(ids, positions, DecodeRows([0], [9]), writes, mirror)
    small = StepWrites(one, one, one, one, num_slots=8, num_rows=2, capacity=8)
    with pytest.raises(ValueError, match="the pool has 256"):
        layers(ids, positions, rows, small, mirror)
    with pytest.raises(ValueError, match="1 mirror layers"):
        layers(ids, positions, rows, writes, mirror[:1])
    odd = [mirror[0], (torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 9, 16)[:, :, :8])]
    with pytest.raises(ValueError, match="mirror layer 1"):
        layers(ids, positions, rows, writes, odd)
    wide = torch.zeros(2, 2, 8, 32)[..., :16]
    with pytest.raises(ValueError, match="contiguous"):
        layers(ids, positions, rows, writes, [(wide, wide), (wide, wide)])
    assert mirror[0][0].abs().sum() == 0  # nothing written by a refused call
    hidden = layers(ids, positions, rows, writes, mirror)  # the same call, well formed, runs
    assert hidden.shape == (1, 64) and hidden.isfinite().all()
    assert mirror[0][0][0, :, 0].abs().sum() > 0  # the new key, in row 0 at position 0


def test_replaced_rope_tables_or_embeddings_send_steps_the_eager_way():
    model = random_model()
    engine = engine_for(model, fused=True)
    fused = engine.runner.fused
    built = fused._current_layers()
    assert built is not None
    model.init_rope("cpu", torch.float32)  # new tables: the structs' pointers are stale
    rebuilt = fused._current_layers()
    assert rebuilt is not None and rebuilt is not built  # rebuilt over the new tables
    assert rebuilt.model.rope_cos is model.rope_cos
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.0)  # an in-place write bumps the version
    assert fused._current_layers() is not rebuilt

"""Built-in models: the same weights in every construction, on every machine."""

from __future__ import annotations

import hashlib

import pytest
import torch

from app.chat.chat_format import SimpleChatFormat
from app.engine.loading.builtin import (
    BUILTIN_MODELS,
    build_builtin_model,
    builtin_config,
    builtin_hf_config_kwargs,
    builtin_tokenizer,
)
from app.engine.loading.loader import resolve_model
from app.engine.network.model import CausalLM

# sha256 over (name, float32 bytes) of builtin-tiny-random's state dict. The weights come from
# integer draws and correctly rounded float ops only, so this holds on any machine; a change
# here means every stored thread of the tiny model would be served by a different network.
TINY_SHA256 = "d257c3e04de16e298b0b9612687b661f03b483d6745ac0bb998d398c9089b8ed"
BENCH_PARAMETERS = 83_086_080


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_tiny_model_is_deterministic():
    first, _ = build_builtin_model("builtin-tiny-random")
    second, _ = build_builtin_model("builtin-tiny-random")
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert weights_sha256(first) == TINY_SHA256


def test_tiny_model_weights_are_scaled_not_degenerate():
    model, config = build_builtin_model("builtin-tiny-random")
    assert model.model.layers[0].input_layernorm.weight.eq(1).all()
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(BUILTIN_MODELS["builtin-tiny-random"].init_std, rel=0.05)
    logits = model.compute_logits(model.model.norm(model.model.embed_tokens.weight[:64]))
    assert logits.std().item() > 0.3  # not a flat distribution: greedy choices have margins


def test_lower_precision_is_the_float32_weights_rounded():
    full, _ = build_builtin_model("builtin-tiny-random")
    half, _ = build_builtin_model("builtin-tiny-random", dtype=torch.bfloat16)
    assert half.rope_cos.dtype == torch.bfloat16
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name].to(torch.bfloat16)), name


def test_bench_model_size_without_building_it():
    with torch.device("meta"):
        model = CausalLM(builtin_config("builtin-bench-random"))
    assert sum(p.numel() for p in model.parameters()) == BENCH_PARAMETERS


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_transformers_config_kwargs_describe_the_same_network(name):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = CausalLM(builtin_config(name))
        theirs = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**builtin_hf_config_kwargs(name))
        )
    ours_shapes = {n: t.shape for n, t in ours.state_dict().items()}
    theirs_shapes = {n: t.shape for n, t in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_resolve_builtin():
    loaded = resolve_model("builtin-tiny-random", "cpu")
    end = loaded.tokenizer.token_to_id("<|end|>")
    assert loaded.name == "builtin-tiny-random"
    assert isinstance(loaded.chat_format, SimpleChatFormat)
    assert loaded.stop_token_ids == loaded.eos_token_ids == {end}
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size == builtin_tokenizer().vocab_size
    assert loaded.max_context_length == loaded.config.max_position_embeddings == 8192
    assert loaded.dtype == torch.float32  # the CPU default
    assert weights_sha256(loaded.model) == TINY_SHA256


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match="unknown built-in model 'builtin-nope'"):
        builtin_config("builtin-nope")

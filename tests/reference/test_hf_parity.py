"""Invariant 3: checkpoints loaded by load_model give transformers' logits (float32, <= 1e-4).

Small random models of each supported architecture are saved with `save_pretrained` once per
module, in the variants the loader must handle: sharded, tied embeddings, Llama 3 rope scaling,
a sliding window, and a config.json rewritten in the transformers 4.x key style.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.engine.loading.builtin import build_builtin_model, builtin_hf_config_kwargs
from app.engine.loading.loader import load_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaling changes the frequencies these short sequences use.
    "original_max_position_embeddings": 16,
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere: transformers leaves norms at 1 and biases at 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def to_4x_key_style(folder: Path) -> None:
    """Rewrite config.json as transformers 4.x wrote it: torch_dtype, rope_theta, rope_scaling."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    raw["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    raw["torch_dtype"] = raw.pop("dtype")
    path.write_text(json.dumps(raw))


CASES = {
    "llama": (transformers.LlamaConfig, dict(max_position_embeddings=256), {}),
    "llama3_rope": (
        transformers.LlamaConfig,
        dict(max_position_embeddings=256, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
        {},
    ),
    "llama3_rope_4x_keys": (
        transformers.LlamaConfig,
        dict(max_position_embeddings=256, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
        {"key_style_4x": True},
    ),
    "llama_linear_rope_4x_keys": (
        transformers.LlamaConfig,
        dict(max_position_embeddings=256, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        {"key_style_4x": True},
    ),
    "llama_tied_sharded": (
        transformers.LlamaConfig,
        dict(max_position_embeddings=256, tie_word_embeddings=True),
        {"max_shard_size": "40KB"},
    ),
    "mistral_window": (
        transformers.MistralConfig,
        dict(max_position_embeddings=256, sliding_window=40),
        {},
    ),
    "qwen2_bias_sharded": (
        transformers.Qwen2Config,
        dict(max_position_embeddings=256),
        {"max_shard_size": "40KB"},
    ),
    "qwen3_qk_norm": (
        transformers.Qwen3Config,
        dict(max_position_embeddings=256, head_dim=32),
        {},
    ),
    "qwen3_tied": (
        transformers.Qwen3Config,
        dict(max_position_embeddings=256, head_dim=16, tie_word_embeddings=True),
        {},
    ),
}
ARCHITECTURES = {
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.MistralConfig: transformers.MistralForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
    transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (folder, the transformers model saved there), built once for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}
    for seed, (name, (config_class, overrides, how)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        # Copies: transformers adds keys to the rope dict it is given.
        config = config_class(
            **SMALL, **{k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}
        )
        hf_model = ARCHITECTURES[config_class](config).eval()
        randomize_(hf_model, seed)
        hf_model.tie_weights()
        folder = root / name
        hf_model.save_pretrained(folder, max_shard_size=how.get("max_shard_size", "50GB"))
        if how.get("key_style_4x"):
            to_4x_key_style(folder)
        built[name] = (folder, hf_model)
    return built


def token_ids(n: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(
        0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, run_paged, name, packed):
    """Plain linears, and the CPU engine's prepacked ones (packed_linear.py)."""
    folder, hf_model = checkpoints[name]
    model, config = load_model(folder, "cpu", torch.float32)
    if packed:
        assert model.prepack_linears()
    length = min(37, config.max_position_embeddings)
    ids = token_ids(length, config.vocab_size, seed=len(name))
    expected = hf_logits(hf_model, ids)
    got = run_paged(model, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_variants_were_really_exercised(checkpoints):
    """The fixture built what the cases claim (guards against a silently ignored option)."""
    assert (checkpoints["llama_tied_sharded"][0] / "model.safetensors.index.json").is_file()
    assert (checkpoints["qwen2_bias_sharded"][0] / "model.safetensors.index.json").is_file()
    raw = json.loads((checkpoints["llama3_rope_4x_keys"][0] / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == "llama3" and "rope_parameters" not in raw
    _, config = load_model(checkpoints["mistral_window"][0], "cpu", torch.float32)
    assert config.max_position_embeddings == 40  # served up to the window, where it is exact
    tied, _ = load_model(checkpoints["llama_tied_sharded"][0], "cpu", torch.float32)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    qwen2, _ = load_model(checkpoints["qwen2_bias_sharded"][0], "cpu", torch.float32)
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_chunked_prefill_and_decode_match_transformers(checkpoints, run_paged, packed):
    """The same logits when the sequence arrives in steps over the KV the earlier steps stored
    (packed: steps of a few tokens take the MLP's feature-major path)."""
    folder, hf_model = checkpoints["llama3_rope"]
    model, config = load_model(folder, "cpu", torch.float32)
    if packed:
        assert model.prepack_linears()
    ids = token_ids(30, config.vocab_size, seed=7)
    got = run_paged(model, ids, block_size=4, chunk_sizes=[9, 1, 1, 13, 1, 5])
    assert (got - hf_logits(hf_model, ids)).abs().max().item() <= TOLERANCE


def test_loaded_model_is_ready_for_inference(checkpoints):
    model, _ = load_model(checkpoints["qwen3_qk_norm"][0], "cpu", torch.float32)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert model.rope_cos.shape == (256, 32)


def test_dtype_conversion_on_load(checkpoints):
    model, _ = load_model(checkpoints["llama"][0], "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cos.dtype == torch.bfloat16
    # dtype None keeps the checkpoint's (config.json says float32 here).
    model, _ = load_model(checkpoints["llama"][0], "cpu")
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_builtin_model_matches_transformers_llama(run_paged):
    """builtin_hf_config_kwargs describes the built-in network: same weights, same logits."""
    model, config = build_builtin_model("builtin-tiny-random")
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**builtin_hf_config_kwargs("builtin-tiny-random"))
    ).eval()
    hf_model.load_state_dict(model.state_dict(), strict=True)
    ids = token_ids(45, config.vocab_size, seed=3)
    assert (run_paged(model, ids) - hf_logits(hf_model, ids)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", list(CASES))
def test_engine_decode_steps_match_transformers(checkpoints, name):
    """The CPU engine's decode steps (the fused decode layers over the thread mirror, where the
    CPU library builds) give transformers' logits for the same tokens, step by step."""
    from app.engine.runtime.llm_engine import LLMEngine
    from app.engine.runtime.types import SamplingParams
    from tests.engine.engine_testing import count_fused

    folder, hf_model = checkpoints[name]
    model, config = load_model(folder, "cpu", torch.float32)
    engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=2)
    fused_steps = count_fused(engine) if engine.runner.fused is not None else None
    rows: list[torch.Tensor] = []
    engine.on_logits = lambda seqs, logits: rows.extend(logits.clone())
    prompt = token_ids(min(17, config.max_position_embeddings - 8), config.vocab_size, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("t", [], prompt, params, first_turn=True)
    generated: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            generated += [e.token_id for e in output.events if hasattr(e, "token_id")]
    assert len(generated) == 6 and len(rows) == 6
    expected = hf_logits(hf_model, prompt + generated[:-1])[len(prompt) - 1 :]
    got = torch.stack(rows)
    assert (got - expected).abs().max().item() <= TOLERANCE
    if fused_steps is not None:
        assert len(fused_steps) == 5  # every decode step went through the fused layers

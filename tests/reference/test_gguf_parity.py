"""Invariant 3 for GGUF files: the engine's logits equal transformers' on the same file.

Small random Llama, Mistral, Qwen2 and Qwen3 models are written as GGUF (tests/gguf_files.py) in
every tensor type the loader accepts, then loaded by both: transformers (`from_pretrained(folder,
gguf_file=...)`) and `load_gguf`. Float32 logits must agree within 1e-4. Files of unquantized
weights must also give the logits of the model they were written from, which checks the
q/k permutation round trip against llama.cpp's converter and not only against transformers.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from app.engine.loading.gguf import load_gguf
from tests.gguf_files import GGUFTokenizer, write_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TOLERANCE = 1e-4
SHAPE = dict(
    hidden_size=256,  # a multiple of the K-quants' 256-value blocks
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# case -> (config class, extra config, GGUF architecture, general.name, tensor type)
CASES = {f"llama-{t.name}": (transformers.LlamaConfig, {}, "llama", "tiny", t) for t in LLAMA_TYPES}
CASES |= {
    "llama-tied-Q8_0": (
        transformers.LlamaConfig,
        {"tie_word_embeddings": True},
        "llama",
        "tiny",
        Q.Q8_0,
    ),
    # llama.cpp writes Mistral as "llama"; transformers reads it back as Mistral by its name.
    "mistral-F16": (transformers.MistralConfig, {}, "llama", "mistral-tiny", Q.F16),
    "qwen2-F32": (transformers.Qwen2Config, {}, "qwen2", "tiny", Q.F32),
    "qwen2-Q4_K": (transformers.Qwen2Config, {}, "qwen2", "tiny", Q.Q4_K),
    # Qwen3's head_dim (128) is not hidden / heads (64): the file says so in key_length.
    "qwen3-F32": (transformers.Qwen3Config, {"head_dim": 128}, "qwen3", "tiny", Q.F32),
    "qwen3-Q8_0": (transformers.Qwen3Config, {"head_dim": 128}, "qwen3", "tiny", Q.Q8_0),
}
INPUT_IDS = [5, 17, 250, 3, 99, 42, 42, 7, 311, 120, 64, 2, 8, 199]


@pytest.fixture(scope="module")
def tokenizer() -> GGUFTokenizer:
    return GGUFTokenizer.train()


def random_hf_model(config_class, extra: dict, vocab_size: int, seed: int):
    defaults = {"tie_word_embeddings": False}
    config = config_class(vocab_size=vocab_size, **SHAPE, **(defaults | extra))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.06 * noise)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_logits_match_transformers_on_the_same_file(case, tokenizer, tmp_path, run_paged):
    config_class, extra, arch, name, qtype = CASES[case]
    source = random_hf_model(config_class, extra, len(tokenizer.tokens), seed=len(case))
    path = write_gguf(tmp_path / f"{case}.gguf", source, arch, qtype, tokenizer, name=name)

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    loaded = load_gguf(path, "cpu", torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([INPUT_IDS])).logits[0]
    actual = run_paged(loaded.model, INPUT_IDS, chunk_sizes=[9, 5])

    assert loaded.config.tie_word_embeddings == source.config.tie_word_embeddings
    assert (actual - expected).abs().max().item() <= TOLERANCE
    if qtype == Q.F32:
        with torch.no_grad():
            original = source(torch.tensor([INPUT_IDS])).logits[0]
        assert (actual - original).abs().max().item() <= TOLERANCE

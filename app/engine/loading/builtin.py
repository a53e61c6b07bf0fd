"""Built-in models, made in code at start: no files, no downloads.

    builtin-tiny-random    Llama architecture, hidden 64, 2 layers: tests and the default server
    builtin-bench-random   Llama architecture, hidden 768, 12 layers (~83M parameters): benchmarks

Both use the byte tokenizer (256 byte tokens, then the chat format's special tokens, padded to a
multiple of 64) and `SimpleChatFormat`. Their weights are random, so their replies are noise, but
the same everywhere: they are drawn on the CPU from a seeded generator as integers and scaled
to a uniform distribution with the spec's standard deviation (Hugging Face's 0.02 for the bench
model), which involves no floating-point library function that could round differently on
another machine. Norm weights are ones, as Hugging Face initialises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from app.chat.chat_format import SimpleChatFormat
from app.chat.tokenizer import ByteTokenizer
from app.engine.loading.hf_config import llama_config_kwargs
from app.engine.network.model import CausalLM, ModelConfig


@dataclass(frozen=True)
class BuiltinSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    seed: int
    init_std: float = 0.02


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "builtin-tiny-random": BuiltinSpec(
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        seed=1234,
        # 1/sqrt(hidden) rather than 0.02: logits of order 1, so greedy choices are decided by
        # clear margins (also in bfloat16), not by rounding.
        init_std=0.125,
    ),
    "builtin-bench-random": BuiltinSpec(
        hidden_size=768,
        intermediate_size=2304,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        seed=5678,
    ),
}

SPECIAL_TOKENS = SimpleChatFormat.SPECIAL_TOKENS
VOCAB_SIZE = 320  # 256 bytes + 5 specials, padded to a multiple of 64
BOS_TOKEN_ID = ByteTokenizer.NUM_BYTES + SPECIAL_TOKENS.index("<|bos|>")
EOS_TOKEN_ID = ByteTokenizer.NUM_BYTES + SPECIAL_TOKENS.index("<|end|>")
RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0

_UNIFORM_BITS = 24  # integers in [0, 2^24) convert to float32 exactly


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def _spec(name: str) -> BuiltinSpec:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r} (built-in: {', '.join(BUILTIN_MODELS)})")
    return BUILTIN_MODELS[name]


def builtin_config(name: str) -> ModelConfig:
    spec = _spec(name)
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        architecture="LlamaForCausalLM",
        extra={
            "model_type": "llama",
            "dtype": "float32",
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_ids": (EOS_TOKEN_ID,),
            "sliding_window": None,
            "declared_max_position_embeddings": spec.max_position_embeddings,
        },
    )


def builtin_tokenizer() -> ByteTokenizer:
    return ByteTokenizer(SPECIAL_TOKENS, vocab_size=VOCAB_SIZE)


def build_builtin_model(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CausalLM, ModelConfig]:
    """The built-in network with its seeded weights, on `device` in `dtype`, ready for inference."""
    config = builtin_config(name)
    spec = _spec(name)
    with torch.device("meta"):
        model = CausalLM(config)  # no default init: every weight is drawn below
    model.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                _fill_seeded_uniform_(param, spec.init_std, generator)
    model.to(device=device, dtype=dtype)
    model.tie_weights()
    model.init_rope(device, dtype)
    model.eval()
    model.requires_grad_(False)
    return model, config


def _fill_seeded_uniform_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Uniform on [-a, a) with standard deviation `std`, from integers (machine-independent)."""
    steps = 1 << _UNIFORM_BITS
    half_width = std * math.sqrt(3.0)
    # Integers below 2^24 are exact in float32; then one IEEE multiply and one subtract, each
    # correctly rounded, so the same bits come out on every machine.
    param.copy_(torch.randint(0, steps, param.shape, generator=generator, dtype=torch.int32))
    param.mul_(2.0 * half_width / steps).sub_(half_width)


def builtin_hf_config_kwargs(name: str) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same network, so a
    benchmark can build `LlamaForCausalLM(LlamaConfig(**kwargs))` and load this model's
    `state_dict()` into it (the parameter names are the same)."""
    return {
        **llama_config_kwargs(builtin_config(name)),
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }

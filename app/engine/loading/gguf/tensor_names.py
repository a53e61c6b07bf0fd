"""GGUF tensor names -> the engine's parameter names, and the q/k rows llama.cpp reorders.

    token_embd.weight            model.embed_tokens.weight
    output_norm.weight           model.norm.weight
    output.weight                lm_head.weight            (absent: tied to the embedding)
    blk.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_{q,k,v}.{w,b}   model.layers.{i}.self_attn.{q,k,v}_proj.*
    blk.{i}.attn_output.weight   model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.attn_{q,k}_norm.w    model.layers.{i}.self_attn.{q,k}_norm.weight   (Qwen3)
    blk.{i}.ffn_norm.weight      model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.ffn_{gate,up,down}   model.layers.{i}.mlp.{gate,up,down}_proj.weight

llama.cpp's converter permutes the rows of q and k in "llama" files (Llama, Mistral), so that its
rope rotates adjacent pairs (GPT-J style) where Hugging Face rotates halves: within each head the
rows go [x0, x_{D/2}, x1, x_{D/2+1}, ...]. `unpermute_qk` undoes it, as transformers' GGUF loader
does; Qwen2/Qwen3 files are written unpermuted (llama.cpp runs them with NeoX-style rope).

    HF rows of one head:    0 1 2 3 | 4 5 6 7          (D = 8: halves rotate together)
    GGUF rows of the head:  0 4 1 5 2 6 3 7            (pairs rotate together)
"""

from __future__ import annotations

import re

import torch

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# general.architecture values whose q/k rows the converter permuted
PERMUTED_ARCHITECTURES = frozenset({"llama"})


def engine_name(gguf_name: str) -> str | None:
    """The parameter a GGUF tensor fills, or None for a name outside the table."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _PER_LAYER:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{int(layer)}.{_PER_LAYER[part]}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q or k projection ([H * D, ...] or a bias [H * D])."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *rest)  # GGUF: pairs
    return per_head.transpose(1, 2).reshape(weight.shape)  # HF: halves

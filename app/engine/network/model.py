"""The Llama family as one implementation: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Parameter names follow the Hugging Face checkpoints, so a safetensors state dict loads as it is.
The forward pass is flat: the new tokens of every sequence in the step stand in one row
(`input_ids [T]`, `positions [T]`), and attention reads/writes the paged KV pool through the
device's attention backend and the step's `AttentionMetadata` (see attention/base.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.network.attention import AttentionBackend, AttentionMetadata
from app.engine.network.compiled_step import paged_attention_op, routes_attention
from app.engine.network.packed_linear import LinearGroup


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"default", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, compare=False)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with the rope scaling the checkpoint asks for (float64 for exactness)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: normalise in float32, round to the input dtype, then scale.
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * normed.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, 1, D]. Rotate-half style, as the Hugging Face Llama does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # its index: which pool it attends over
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.wqkv = LinearGroup(self.q_proj, self.k_proj, self.v_proj)
        self.wo = LinearGroup(self.o_proj)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.wqkv(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = apply_rope(self.q_norm(q), cos, sin)
            k = apply_rope(self.k_norm(k), cos, sin)
        else:  # q and k side by side: one rotation for both (a decode step is mostly small ops)
            qk = apply_rope(torch.cat((q, k), dim=1), cos, sin)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        if routes_attention():  # a compiled decode step (compiled_step.py)
            out = paged_attention_op(q, k, v, self.layer, self.scale)
        else:
            k_cache, v_cache = kv_cache
            attn.store_kv(k, v, k_cache, v_cache, meta)
            out = attn.forward(q, k_cache, v_cache, meta, self.scale, self.layer)  # [T, Hq, D]
        (out,) = self.wo(out.reshape(num_tokens, self.num_heads * self.head_dim))
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w13 = LinearGroup(self.gate_proj, self.up_proj)
        self.w2 = LinearGroup(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed product at every row count: the feature-major `transposed` form measured
        # slower here (2 cores of an AMD EPYC, torch 2.13: decode steps 1.2-1.9x faster without
        # it at 1-8 rows; see packed_linear.py).
        gate, up = self.w13(x)
        (out,) = self.w2(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, meta, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """One class for every supported architecture; the config switches the variants on."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head = LinearGroup(self.lm_head)
        # Rope tables are derived, not loaded: non-persistent, built by init_rope() on the
        # final device (the loader builds modules on the meta device first).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def linear_groups(self) -> list[LinearGroup]:
        groups = [self.head]
        for layer in self.model.layers:
            groups += [layer.self_attn.wqkv, layer.self_attn.wo, layer.mlp.w13, layer.mlp.w2]
        return groups

    def prepack_linears(self) -> bool:
        """Prepack every linear for the CPU (see packed_linear.py); False where that does not
        apply (CUDA, other dtypes, no oneDNN): q/k/v and gate/up are then fused into one plain
        weight each, and the single linears serve as they are."""
        return all([group.pack() for group in self.linear_groups()])

    def init_rope(self, device: torch.device | str, dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(self.config)  # [D/2] float64
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float64)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        # Round through float32 as transformers does, then to the model dtype.
        self.rope_cos = emb.cos().float().to(device=device, dtype=dtype)
        self.rope_sin = emb.sin().float().to(device=device, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
        meta: AttentionMetadata,
        attn: AttentionBackend,  # prepared for this step's meta
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[positions].unsqueeze(1)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        (logits,) = self.head(hidden)
        return logits.float()

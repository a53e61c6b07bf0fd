"""Next-token choice for a batch of logit rows, each row with its own sampling params.

Greedy rows (temperature 0) take the argmax. Sampled rows are scaled by temperature, cut by
top-k and top-p, and drawn by inverse CDF from one uniform number out of the row's own
generator: the draw depends only on the row's logits and its generator, so a seeded sequence
gets the same tokens alone or batched. The generators live on the CPU (`Sequence`), so drawing
the uniforms costs no device launch; on CUDA the batched softmax/cumsum may round differently
for different batch shapes, so "the same seeded sample alone or batched" is exact on the CPU and
holds on CUDA up to ties decided by the last bit.

Per step the sampled rows' parameters and uniforms travel to the device as one [5, n] table:
pinned and copied non-blocking on CUDA (no sync, one copy), and the rest is batched tensor work.
"""

from __future__ import annotations

import math

import torch

from app.engine.runtime.types import SamplingParams


def sample(
    logits: torch.Tensor,  # [N, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator],  # CPU generators, one per row
) -> torch.Tensor:
    """The chosen token id of every row, [N] int64 (on the logits' device)."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    device = logits.device
    vocab_size = logits.shape[-1]
    sampled = [params[i] for i in rows]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in sampled]
    top_p = [p.top_p for p in sampled]
    table = _to_device(
        [rows, [p.temperature for p in sampled], [k - 1 for k in top_k], top_p],
        torch.cat([torch.rand(1, generator=generators[i]) for i in rows]),
        device,
    )  # [5, n]: row, temperature, top-k - 1, top-p, uniform
    index = table[0].long()
    x = logits.index_select(0, index) / table[1].unsqueeze(1)  # [n, V]

    if min(top_k) < vocab_size:
        kth = table[2].long().unsqueeze(1)
        threshold = x.topk(max(top_k), dim=-1).values.gather(1, kth)  # [n, 1]
        x = x.masked_fill(x < threshold, float("-inf"))
    probs = torch.softmax(x, dim=-1)

    if min(top_p) < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the likelier tokens
        sorted_probs = sorted_probs.masked_fill(before >= table[3].unsqueeze(1), 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)

    cdf = probs.cumsum(dim=-1)
    target = (table[4] * cdf[:, -1]).unsqueeze(1)  # the kept mass need not sum to exactly 1
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab_size - 1)
    chosen[index] = picked
    return chosen


def _to_device(columns: list[list[float]], uniforms: torch.Tensor, device: torch.device):
    """One float32 host table (exact for row indices and k below 2^24), one copy."""
    is_cuda = device.type == "cuda"
    host = torch.empty((len(columns) + 1, len(uniforms)), pin_memory=is_cuda)
    host[: len(columns)] = torch.tensor(columns, dtype=torch.float32)
    host[len(columns)] = uniforms
    return host.to(device, non_blocking=is_cuda)


def validate_params(params: SamplingParams) -> None:
    """Refuse values the sampler cannot honour, with the offending field named."""
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not (params.temperature >= 0 and math.isfinite(params.temperature)):
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 is off), got {params.top_k}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise ValueError("stop strings must be non-empty strings")

"""Compiled decode steps: the decode forward pass at a few fixed batch sizes, padded up to them.

A step of decodes is one token per sequence, so its shapes are those of the batch size alone,
except attention's keys, which grow every step. The cache compiles the forward pass once per
batch-size bucket (torch.compile, inductor's CPU codegen: norms, rope, SiLU and residual adds
fused around the linears) with attention as one opaque op, `kvthreads::paged_attention`, that
calls the step's backend eagerly; a later CUDA-graph capture replays the same graphs around the
same op. Prefills and mixed steps stay eager, and so does a decode batch past the largest bucket
or a bucket that did not compile in the warm-up's time.

    steps = DecodeStepCache(model, kv_caches, buckets=(1, 2, 4, 8))
    steps.warm_up(budget_s=120)                   # compile the buckets, smallest first
    if steps.can_run(num_tokens, max_seqlen_q):  # a step of decodes within a compiled bucket
        hidden = steps.run(input_ids, positions, meta, attn)   # [B, hidden]

    real rows  0 .. B-1 | padding B .. bucket-1  (token 0 at position 0: computed, never stored,
                                                  never attended, cut off the output)

The linears enter the graph as `kvthreads::packed_linear` (packed_linear.py); whether every
group is still packed is checked once a step in `can_run` (a weight replaced since: eager).
Compiled artifacts persist in inductor's cache folder (TORCHINDUCTOR_CACHE_DIR), so a restart
recompiles from the cache in a fraction of the first time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from app.engine.network.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
WARMUP_BUDGET_S = 300.0  # compile buckets, smallest first, until this much time has gone


@dataclass
class _StepContext:
    attn: AttentionBackend | None  # None: a warm-up pass, attention gives zeros
    meta: AttentionMetadata | None
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    num_seqs: int  # real rows; the rest of the bucket is padding


_current: _StepContext | None = None


@contextmanager
def _step_context(ctx: _StepContext) -> Iterator[None]:
    global _current
    if _current is not None:
        raise RuntimeError("a compiled decode step is already running")
    _current = ctx
    try:
        yield
    finally:
        _current = None


def routes_attention() -> bool:
    """Whether the layers call kvthreads::paged_attention: while compiling (dynamo reads no
    global then, so no guard on it) or inside a step run through the cache (a capture)."""
    return torch.compiler.is_compiling() or _current is not None


@torch.library.custom_op("kvthreads::paged_attention", mutates_args=())
def paged_attention_op(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    """Store the step's keys/values of `layer` in the pool and attend over it, through the
    running step's backend; the padding rows get zeros. q [T, Hq, D], key/value [T, Hkv, D]."""
    ctx = _current
    if ctx is None:
        raise RuntimeError("kvthreads::paged_attention runs only inside a compiled decode step")
    out = torch.zeros_like(q)
    if ctx.attn is None:
        return out
    n = ctx.num_seqs
    k_cache, v_cache = ctx.kv_caches[layer]
    ctx.attn.store_kv(key[:n], value[:n], k_cache, v_cache, ctx.meta)
    out[:n] = ctx.attn.forward(q[:n], k_cache, v_cache, ctx.meta, scale, layer)
    return out


@paged_attention_op.register_fake
def _(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    return torch.empty_like(q)


class DecodeStepCache:
    """The model's decode forward pass per batch-size bucket: compiled, or None (eager)."""

    def __init__(
        self,
        model: torch.nn.Module,  # a CausalLM (model.py imports this module for its op)
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        compile_fn: Callable[[Callable], Callable] | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = sorted(set(buckets))
        self.compile_fn = compile_fn or _inductor
        self.steps: dict[int, Callable | None] = dict.fromkeys(self.buckets)
        self.device = kv_caches[0][0].device
        self._groups = model.linear_groups()
        # One cache entry per bucket on the same code object (and more for other models).
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 8 * len(self.buckets))

    def bucket_for(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    def warm_up(self, budget_s: float = WARMUP_BUDGET_S) -> list[int]:
        """Compile the buckets, smallest first, while the budget lasts (a bucket started is
        finished); the rest stay eager. Returns the compiled buckets."""
        start = time.perf_counter()
        for bucket in self.buckets:
            if time.perf_counter() - start > budget_s:
                log.info("compile budget spent: decode batches over %d run eager", bucket // 2)
                break
            t0 = time.perf_counter()
            try:
                step = self.compile_fn(self._forward)
                zeros = torch.zeros(bucket, dtype=torch.int64, device=self.device)
                with torch.inference_mode(), _step_context(_StepContext(None, None, [], 0)):
                    step(zeros, zeros)  # compiles; attention gives zeros, the pool is untouched
            except Exception:  # a backend that cannot compile this: the bucket stays eager
                log.warning("compiling the decode step for %d sequences failed", bucket, exc_info=1)
                continue
            self.steps[bucket] = step
            log.info(
                "decode step for %d sequences compiled in %.1f s", bucket, time.perf_counter() - t0
            )
        return [b for b, step in self.steps.items() if step is not None]

    def can_run(self, num_tokens: int, max_seqlen_q: int) -> bool:
        """A step of decodes (one query per sequence) within a compiled bucket, every linear
        still packed or fused as it was when traced."""
        if max_seqlen_q != 1:
            return False
        bucket = self.bucket_for(num_tokens)
        if bucket is None or self.steps[bucket] is None:
            return False
        return not any(group.is_stale for group in self._groups)

    def run(
        self,
        input_ids: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B]
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [B, hidden], through the bucket's compiled step."""
        num_seqs = input_ids.shape[0]
        bucket = self.bucket_for(num_seqs)
        step = self.steps[bucket]
        pad = bucket - num_seqs
        if pad:
            input_ids = F.pad(input_ids, (0, pad))
            positions = F.pad(positions, (0, pad))
        with _step_context(_StepContext(attn, meta, self.kv_caches, num_seqs)):
            hidden = step(input_ids, positions)
        return hidden[:num_seqs]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # meta and attn stay outside the graph: the layers call kvthreads::paged_attention.
        return self.model(input_ids, positions, self.kv_caches, None, None)


def _inductor(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)

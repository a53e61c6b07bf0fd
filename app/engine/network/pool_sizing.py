"""How big the KV pool and the per-step token budget are, from the device's free memory.

Pure arithmetic on ints, so a test can size the pool for a fake device:

    plan = plan_pool(PoolRequest(bytes_per_block=..., block_size=16, ...), free_bytes=70 * 2**30)
    plan.num_blocks, plan.num_tokens, plan.max_batch_tokens

An explicit size (KVTHREADS_KV_CACHE_MB) always wins. Without one, a CUDA device gives the pool
`memory_utilization` (KVTHREADS_GPU_MEMORY_UTILIZATION, default 0.9) of the memory free once the
weights are loaded, less a reserve for one step's activations (the per-step token budget's
hidden states, MLP and logits); any other device gets DEFAULT_CPU_KV_CACHE_MB. Without an
explicit max_batch_tokens, the budget grows with the pool: an eighth of the pool's tokens,
rounded down to a power of two, between 512 and 8192 (a step never asks for more KV than a
fraction of the pool, and a big pool is worth long prefill chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20
DEFAULT_CPU_KV_CACHE_MB = 256
DEFAULT_MEMORY_UTILIZATION = 0.9
MIN_BATCH_TOKENS, MAX_BATCH_TOKENS = 512, 8192
CPU_BATCH_TOKENS = 512


@dataclass(frozen=True)
class PoolRequest:
    """What sizing needs to know about the model, the device and the settings."""

    bytes_per_block: int  # KV bytes of one block over all layers (kv_pool.bytes_per_block)
    block_size: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    element_size: int  # bytes per activation element (the model's dtype)
    max_num_seqs: int
    is_cuda: bool
    kv_cache_mb: int | None = None  # explicit pool size: wins over the device
    max_batch_tokens: int | None = None  # explicit per-step budget
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION


@dataclass(frozen=True)
class PoolPlan:
    num_blocks: int
    block_size: int
    max_batch_tokens: int
    pool_bytes: int
    source: str  # "setting" | "device" | "cpu default"

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return (
            f"KV pool {self.num_tokens} tokens ({self.num_blocks} blocks of {self.block_size}, "
            f"{self.pool_bytes / MiB:.0f} MiB, {self.source}), {self.max_batch_tokens} tokens "
            "per step"
        )


def activation_bytes(request: PoolRequest, max_batch_tokens: int) -> int:
    """A generous bound on one step's transient memory: per token the residual stream and its
    norm, q/k/v, attention output, gate/up/act (x3 of hidden + 3 x intermediate), in the model's
    dtype; float32 logits of every sampled row, twice (sampling's softmax)."""
    per_token = (8 * request.hidden_size + 3 * request.intermediate_size) * request.element_size
    logits = 2 * request.max_num_seqs * request.vocab_size * 4
    return max_batch_tokens * per_token + logits


def batch_tokens_for_pool(num_tokens: int) -> int:
    budget = MIN_BATCH_TOKENS
    while budget * 2 <= min(num_tokens // 8, MAX_BATCH_TOKENS):
        budget *= 2
    return budget


def _reserved_budget(request: PoolRequest, usable: int) -> int:
    """The step budget to reserve activations for: the pool depends on the reserve and the
    budget on the pool, so take the largest budget whose pool still chooses no larger one."""
    if request.max_batch_tokens is not None:
        return request.max_batch_tokens
    budget = MAX_BATCH_TOKENS
    while budget > MIN_BATCH_TOKENS:
        pool_bytes = usable - activation_bytes(request, budget)
        num_tokens = max(pool_bytes, 0) // request.bytes_per_block * request.block_size
        if pool_bytes > 0 and batch_tokens_for_pool(num_tokens) >= budget:
            break
        budget //= 2
    return budget


def plan_pool(request: PoolRequest, free_bytes: int | None = None) -> PoolPlan:
    """The pool's blocks and the per-step budget. `free_bytes`: the device's free memory after
    the weights (torch.cuda.mem_get_info()[0]); needed only on CUDA without kv_cache_mb."""
    if request.bytes_per_block <= 0 or request.block_size <= 0:
        raise ValueError("bytes_per_block and block_size must be positive")
    if not 0 < request.memory_utilization <= 1:
        raise ValueError(f"memory utilization must be in (0, 1], got {request.memory_utilization}")
    if request.kv_cache_mb is not None:
        pool_bytes, source = request.kv_cache_mb * MiB, "setting"
    elif not request.is_cuda:
        pool_bytes, source = DEFAULT_CPU_KV_CACHE_MB * MiB, "cpu default"
    else:
        if free_bytes is None:
            raise ValueError("sizing the pool from a CUDA device needs its free memory")
        usable = int(free_bytes * request.memory_utilization)
        pool_bytes = usable - activation_bytes(request, _reserved_budget(request, usable))
        source = f"device: {request.memory_utilization:g} of {free_bytes / MiB:.0f} MiB free"
    num_blocks = pool_bytes // request.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV pool gets {max(pool_bytes, 0) / MiB:.1f} MiB ({source}): not one block of "
            f"{request.block_size} tokens ({request.bytes_per_block} bytes)"
        )
    num_tokens = num_blocks * request.block_size
    if request.max_batch_tokens is not None:
        max_batch_tokens = request.max_batch_tokens
    elif request.is_cuda:
        max_batch_tokens = batch_tokens_for_pool(num_tokens)
    else:
        max_batch_tokens = CPU_BATCH_TOKENS
    return PoolPlan(
        num_blocks=num_blocks,
        block_size=request.block_size,
        max_batch_tokens=max_batch_tokens,
        pool_bytes=num_blocks * request.bytes_per_block,
        source=source,
    )

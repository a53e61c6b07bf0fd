"""The KV pool tensor: allocated once, sized from a memory budget, viewed per layer.

pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (2: keys, values)
layer i: (pool[i, 0], pool[i, 1]), each [num_blocks, block_size, num_kv_heads, head_dim]
"""

from __future__ import annotations

import torch

from app.engine.network.model import ModelConfig
from app.engine.network.pool_sizing import (
    DEFAULT_MEMORY_UTILIZATION,
    PoolPlan,
    PoolRequest,
    plan_pool,
)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size


def num_blocks_for_budget(
    config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_mb: float
) -> int:
    num_blocks = int(kv_cache_mb * 2**20) // bytes_per_block(config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(
            f"a KV cache of {kv_cache_mb} MB holds no block of {block_size} tokens "
            f"({bytes_per_block(config, block_size, dtype)} bytes each)"
        )
    return num_blocks


class KVPool:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeros, not empty: padded attention reads masked slots, and 0 * NaN would leak through.
        self.tensor = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )
        self.layer_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (self.tensor[i, 0], self.tensor[i, 1]) for i in range(config.num_layers)
        ]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values, every layer (copy-on-write of a shared block)."""
        self.tensor[:, :, dst].copy_(self.tensor[:, :, src])


def plan_for_model(
    model: torch.nn.Module,
    *,
    block_size: int,
    max_num_seqs: int,
    kv_cache_mb: int | None = None,
    max_batch_tokens: int | None = None,
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
) -> PoolPlan:
    """Size the pool for a loaded model on its device (see pool_sizing.py); call it after the
    weights are on the device and before anything else big is allocated there."""
    config: ModelConfig = model.config
    param = next(model.parameters())
    is_cuda = param.device.type == "cuda"
    free_bytes = None
    if is_cuda and kv_cache_mb is None:
        torch.cuda.synchronize(param.device)
        torch.cuda.empty_cache()
        free_bytes = torch.cuda.mem_get_info(param.device)[0]
    request = PoolRequest(
        bytes_per_block=bytes_per_block(config, block_size, param.dtype),
        block_size=block_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        element_size=param.element_size(),
        max_num_seqs=max_num_seqs,
        is_cuda=is_cuda,
        kv_cache_mb=kv_cache_mb,
        max_batch_tokens=max_batch_tokens,
        memory_utilization=memory_utilization,
    )
    return plan_pool(request, free_bytes)

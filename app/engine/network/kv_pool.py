"""The KV pool tensor: allocated once, sized from a memory budget, viewed per layer.

pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (2: keys, values)
layer i: (pool[i, 0], pool[i, 1]), each [num_blocks, block_size, num_kv_heads, head_dim]
"""

from __future__ import annotations

import torch

from app.engine.network.model import ModelConfig


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

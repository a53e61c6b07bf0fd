"""GGUF tensor data -> a float32 torch tensor, for the types the engine accepts.

Quantized types are expanded once at load (gguf.quants.dequantize, numpy) and the network then
runs in the serving dtype; nothing stays packed. Any other type is refused by name, so a file the
engine cannot read exactly never loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as _dequantize

from app.engine.loading.hf_config import ModelLoadError

SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)


def check_type(tensor: Any, source: str) -> None:
    qtype = Q(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelLoadError(
            f"{source}: tensor {tensor.name!r} has type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )


def dequantize(tensor: Any, source: str) -> torch.Tensor:
    """A gguf ReaderTensor as float32 in PyTorch's layout ([rows, cols]: GGUF's shape reversed)."""
    check_type(tensor, source)
    values = _dequantize(tensor.data, Q(tensor.tensor_type))
    shape = tuple(int(n) for n in reversed(tensor.shape))
    # A copy where the values are still the file's (F32 tensors are read-only memory-map views).
    values = np.array(values, dtype=np.float32, copy=not values.flags.writeable).reshape(shape)
    return torch.from_numpy(values)

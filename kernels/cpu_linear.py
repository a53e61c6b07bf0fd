"""Linears on the CPU (float32) over weights packed for streaming: kernels/cpu_linear.cpp.

    packed = PackedLinear.pack(weight, bias)     # once: [out, in] (+ [out]) -> the kernel's layout
    y = packed(x)                                # x [rows, in] -> x W^T + b, [rows, out]

The layout is [out/64, in, 64] (64 output features side by side for each input feature; out
padded with zero rows to a multiple of 64), the bias padded the same. The reference is
`F.linear(x, weight, bias)` (the tests compare them); why the layout and the tiles, and the
measurements against oneDNN: cpu_linear.cpp.
"""

from __future__ import annotations

import ctypes

import torch

BLOCK = 64  # output features per block (kBlock in cpu_linear.cpp)


class PackedLinear:
    """One weight (and bias) in the kernel's layout, and the call that multiplies by it."""

    def __init__(
        self,
        library: ctypes.CDLL,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
    ) -> None:
        self.packed, self.bias = packed, bias
        self.in_features, self.out_features = in_features, out_features
        self._run = library.kvt_linear_f32
        self._run.restype = None
        self._run.argtypes = [
            ctypes.c_void_p,
            *(ctypes.c_int64,) * 2,
            *(ctypes.c_void_p,) * 2,
            *(ctypes.c_int64,) * 2,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int,
        ]

    @classmethod
    def pack(
        cls, library: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> PackedLinear:
        """weight [out, in] (and bias [out]) float32 on the CPU, copied into the layout."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(
                f"weight must be a 2-d float32 tensor on the CPU, got {weight.dtype} "
                f"{tuple(weight.shape)} on {weight.device}"
            )
        out_features, in_features = weight.shape
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
            raise ValueError(f"bias must be float32 [{out_features}], got {tuple(bias.shape)}")
        num_blocks = -(-out_features // BLOCK)
        with torch.inference_mode(False), torch.no_grad():
            padded = weight.new_zeros(num_blocks * BLOCK, in_features)
            padded[:out_features] = weight
            packed = padded.view(num_blocks, BLOCK, in_features).transpose(1, 2).contiguous()
            padded_bias = None
            if bias is not None:
                padded_bias = bias.new_zeros(num_blocks * BLOCK)
                padded_bias[:out_features] = bias
        return cls(library, packed, padded_bias, in_features, out_features)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] (rows any stride, contiguous in `in`) -> [rows, out]."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
            raise ValueError(f"x must be 2-d float32 on the CPU, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] != self.in_features:
            raise ValueError(f"x has {x.shape[1]} features, the weight {self.in_features}")
        if x.stride(1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        if out is None:
            out = x.new_empty(rows, self.out_features)
        elif out.shape != (rows, self.out_features) or out.stride(1) != 1:
            raise ValueError(f"out must be [{rows}, {self.out_features}] contiguous in features")
        if rows:
            self._run(
                x.data_ptr(),
                rows,
                x.stride(0),
                self.packed.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                self.in_features,
                self.out_features,
                out.data_ptr(),
                out.stride(0),
                torch.get_num_threads(),
            )
        return out

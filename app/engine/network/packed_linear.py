"""Linears that read the same input, run as one GEMM over weights prepacked for the CPU.

Why: a decode step multiplies a handful of rows (one per sequence) by every weight matrix. On this
project's CPUs (AMD EPYC, AVX2) the BLAS behind `F.linear` runs such thin products at half the
speed of reading the weights once; oneDNN's matmul over a weight reordered ahead of time into its
blocked layout runs them at memory speed (83M-parameter model, 8 rows: 30 ms for every linear of a
step instead of 60; the same speed at 1 row and for long prefills). Packing the q/k/v projections
(and gate/up) as one matrix also makes one call of three.

    group = LinearGroup(q_proj, k_proj, v_proj)
    q, k, v = group(x)          # three F.linear calls, or one packed GEMM split three ways
    group.pack()                # the engine does this once, for a float32 model on the CPU
    y_t = group.transposed(x)   # a few rows: (x W^T)^T = W x^T, [sum of out_features, rows]

`transposed` is faster still for up to SMALL_BATCH rows (5-17% per product at 8 rows): oneDNN then
streams the weight as it is, with the few rows as the small operand. Its output is feature-major,
which suits the MLP (gate/up -> SiLU * up -> down stays feature-major; one transpose at the end).

Packing makes the members' weights views of one concatenated matrix (the checkpoint's names and
values are unchanged), so the only extra memory is the packed copy, one per weight. That copy is
used only while every source weight is the very tensor, storage and version it was packed from:
a weight loaded, replaced or moved after packing is never served stale; the group falls back to
plain linears until packed again.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_BATCH = 16  # rows up to which `transposed` beats the packed product (measured: 1-16 rows)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN prepacking applies: a float32 weight on a CPU build with oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _sources(linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    # The parameter dict, not `linear.weight`: Module.__getattr__ costs more than the rest of
    # this check, which runs on every call.
    params = [linear._parameters for linear in linears]
    return [t for p in params for t in (p["weight"], p["bias"]) if t is not None]


def _fingerprint(tensors: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """What changes when a weight is replaced, moved or written in place."""
    return [(id(t), t.data_ptr(), t._version) for t in tensors]


class LinearGroup:
    """Linears over one input: `group(x)` returns one output per linear, in order."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.out_features = [linear.out_features for linear in linears]
        self._weight: torch.Tensor | None = None  # the members' weights as one matrix
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._packed_from: list[tuple[int, int, int]] = []

    @property
    def is_packed(self) -> bool:
        """Packed, and every source weight and bias unchanged since."""
        return (
            self._packed is not None and _fingerprint(_sources(self.linears)) == self._packed_from
        )

    def pack(self) -> bool:
        """Prepack the group's weights (and biases) as one matrix; False where it does not apply."""
        if self.is_packed:
            return True
        weights = [linear.weight for linear in self.linears]
        if not all(can_pack(w) for w in weights):
            self.unpack()
            return False
        biases = [linear.bias for linear in self.linears]
        # Normal tensors even when called under inference mode: the staleness check reads
        # version counters, which inference tensors do not keep.
        with torch.inference_mode(False), torch.no_grad():
            if len(self.linears) == 1:
                weight = weights[0].detach()
            else:
                weight = torch.cat([w.detach() for w in weights])
                start = 0
                for linear, w in zip(self.linears, weights, strict=True):
                    end = start + w.shape[0]
                    linear.weight = nn.Parameter(weight[start:end], requires_grad=w.requires_grad)
                    start = end
            packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() if b is not None else w.new_zeros(w.shape[0])
                        for w, b in zip(weights, biases, strict=True)
                    ]
                )
        self._weight = weight
        self._packed = (packed_weight, bias)
        self._packed_from = _fingerprint(_sources(self.linears))
        return True

    def unpack(self) -> None:
        self._weight = None
        self._packed = None
        self._packed_from = []

    def transposed(self, x: torch.Tensor) -> torch.Tensor | None:
        """W x^T for x [rows, in] (any strides): [sum of out_features, rows], feature-major.
        None unless packed and rows <= SMALL_BATCH: the caller then uses `group(x)`."""
        if x.shape[0] > SMALL_BATCH or not self.is_packed:
            return None
        out_t = torch.ops.mkldnn._linear_pointwise(self._weight, x, None, "none", [], "")
        bias = self._packed[1]
        return out_t if bias is None else out_t.add_(bias.unsqueeze(1))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.is_packed:
            weight, bias = self._packed
            out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            if len(self.linears) == 1:
                return [out]
            return list(out.split(self.out_features, dim=-1))
        return [linear(x) for linear in self.linears]

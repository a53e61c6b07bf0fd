"""Linears that read the same input, run as one GEMM over weights prepacked for the CPU.

Why: a decode step multiplies a handful of rows (one per sequence) by every weight matrix, so its
time is the weights read once. On this project's CPUs (AMD EPYC) the BLAS behind `F.linear` runs
such thin products at half that speed (and prefills at a third of it). A weight copied once into
a layout made for streaming reads at memory speed: kvthreads' own kernel (kernels/cpu_linear.cpp,
float32 where the CPU library builds: 5-8% faster than oneDNN at 1-8 rows, even from 72), or
else oneDNN's matmul over a weight reordered into its blocked layout. Packing q/k/v (and
gate/up) as one matrix also makes one call of three, and gives the fused decode layers
(kernels/cpu_decode_layers.py) one weight per product.

    group = LinearGroup(q_proj, k_proj, v_proj)
    q, k, v = group(x)          # three F.linear calls, or one packed GEMM split three ways
    group.pack()                # the engine does this once: the library's layout (else
                                # oneDNN's) for a float32 model on the CPU, one concatenated
                                # weight elsewhere (CUDA, bf16)
    y_t = group.transposed(x)   # a few rows: (x W^T)^T = W x^T, [sum of out_features, rows]

Under `torch.compile` (the compiled decode step, compiled_step.py) the group is called through
the opaque op `kvthreads::packed_linear` by a handle: inductor cannot lower packed weights
itself, and the staleness check (ids, pointers, versions) is done once a step outside the graph.

`transposed` streams the weight as it is, with the few rows as the small operand (up to SMALL_BATCH
rows; output feature-major). It measured 5-17% faster per product at 8 rows on an earlier run, but
slower than the packed product at 1-8 rows on the CPUs of the speed issue (2 cores of an AMD
EPYC, torch 2.13: 22-30 GB/s against 35-38 GB/s at one row, whole decode steps 1.2-1.9x slower),
so the model no longer calls it; it stays for CPUs where it wins.

Where packing does not apply (CUDA, other dtypes), `pack` still fuses a group of several
linears: their weights become views of one torch.cat'd matrix (and biases one vector), and the
group runs one `F.linear` over it and splits the output (`is_fused`): one GEMM launch instead of
three for q/k/v, two for gate/up, and no extra memory.

Packing makes the members' weights views of one concatenated matrix (the checkpoint's names and
values are unchanged), so the only extra memory is the packed copy, one per weight. That copy is
used only while every source weight is the very tensor, storage and version it was packed from:
a weight loaded, replaced or moved after packing is never served stale; the group falls back to
plain linears until packed again.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_library import load_cpu_library
from kernels.cpu_linear import PackedLinear

SMALL_BATCH = 16  # rows up to which `transposed` beats the packed product (measured: 1-16 rows)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether packing applies: a float32 weight on the CPU, with the CPU library or oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and (load_cpu_library() is not None or _has_onednn())
    )


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def _sources(linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    # The parameter dict, not `linear.weight`: Module.__getattr__ costs more than the rest of
    # this check, which runs on every call.
    params = [linear._parameters for linear in linears]
    return [t for p in params for t in (p["weight"], p["bias"]) if t is not None]


def weights_fingerprint(
    tensors: Iterable[torch.Tensor | None],
) -> list[tuple[int, int, int] | None]:
    """What changes when a weight is replaced, moved or written in place (None stays None: a
    bias that appears or goes shows too)."""
    return [None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors]


_GROUPS: weakref.WeakValueDictionary[int, LinearGroup] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("kvthreads::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, transposed: bool) -> torch.Tensor:
    """The packed product of the group registered as `handle`: x W^T [rows, out], or W x^T
    [out, rows] when `transposed`. The caller has checked that the group is packed."""
    group = _GROUPS[handle]
    return group._transposed_product(x) if transposed else group._packed_product(x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int, transposed: bool) -> torch.Tensor:
    out_features = _GROUPS[handle].num_out_features
    if transposed:
        return x.new_empty(out_features, x.shape[0])
    return x.new_empty(x.shape[0], out_features)


class LinearGroup:
    """Linears over one input: `group(x)` returns one output per linear, in order."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.out_features = [linear.out_features for linear in linears]
        self.num_out_features = sum(self.out_features)
        self.handle = next(_HANDLES)  # kvthreads::packed_linear's name for it
        _GROUPS[self.handle] = self
        self._weight: torch.Tensor | None = None  # the members' weights as one matrix
        # Packed: by the CPU library (`native`), or for oneDNN (weight, bias); one at a time.
        self.native: PackedLinear | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # plain weight, bias
        # The sources' fingerprint when packed or fused (one of the two at a time).
        self._packed_from: list[tuple[int, int, int] | None] = []

    @property
    def is_packed(self) -> bool:
        """Packed, and every source weight and bias unchanged since."""
        return self._has_packed and weights_fingerprint(_sources(self.linears)) == self._packed_from

    @property
    def _has_packed(self) -> bool:
        return self.native is not None or self._packed is not None

    @property
    def is_fused(self) -> bool:
        """Fused into one plain concatenated weight, and every source unchanged since."""
        return (
            self._fused is not None
            and weights_fingerprint(_sources(self.linears)) == self._packed_from
        )

    @property
    def is_stale(self) -> bool:
        """Packed or fused once, but a source weight or bias changed since (plain linears serve
        until packed again)."""
        if not self._has_packed and self._fused is None:
            return False
        return weights_fingerprint(_sources(self.linears)) != self._packed_from

    def pack(self, *, native: bool = True) -> bool:
        """Prepack the group's weights (and biases) as one matrix: in the CPU library's layout
        where it is built (unless `native` is False), else oneDNN's. False where neither
        applies, and the group is fused into one plain weight instead (several linears)."""
        library = load_cpu_library() if native else None
        if self.is_packed and (self.native is not None) == (library is not None):
            return True
        self.unpack()
        if not all(can_pack(linear.weight) for linear in self.linears) or (
            library is None and not _has_onednn()
        ):
            self.fuse()
            return False
        weight, bias = self._concatenate()
        if library is not None:
            self.native = PackedLinear.pack(library, weight, bias)
        else:
            with torch.inference_mode(False), torch.no_grad():
                self._packed = (torch.ops.mkldnn._reorder_linear_weight(weight, None), bias)
        self._weight = weight
        self._packed_from = weights_fingerprint(_sources(self.linears))
        return True

    def fuse(self) -> bool:
        """Run the group as one F.linear over its concatenated weight (any device and dtype);
        False for a single linear, which has nothing to fuse."""
        if self.is_fused:
            return True
        self.unpack()
        if len(self.linears) == 1:
            return False
        self._fused = self._concatenate()
        self._packed_from = weights_fingerprint(_sources(self.linears))
        return True

    def unpack(self) -> None:
        self._weight = None
        self.native = None
        self._packed = None
        self._fused = None
        self._packed_from = []

    def _concatenate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' weights as one matrix, which they become views of (names and values
        unchanged), and their biases as one vector (zeros for a member without)."""
        weights = [linear.weight for linear in self.linears]
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
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() if b is not None else w.new_zeros(w.shape[0])
                        for w, b in zip(weights, biases, strict=True)
                    ]
                )
        return weight, bias

    def transposed(self, x: torch.Tensor) -> torch.Tensor | None:
        """W x^T for x [rows, in] (any strides): [sum of out_features, rows], feature-major.
        None unless packed and rows <= SMALL_BATCH: the caller then uses `group(x)`."""
        if torch.compiler.is_compiling():  # packed: checked before the compiled step runs
            if x.shape[0] > SMALL_BATCH or not self._has_packed:
                return None
            return torch.ops.kvthreads.packed_linear(x, self.handle, True)
        if x.shape[0] > SMALL_BATCH or not self.is_packed:
            return None
        return self._transposed_product(x)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():  # packed or fused: checked before the step runs
            if self._has_packed:
                out = torch.ops.kvthreads.packed_linear(x, self.handle, False)
            elif self._fused is not None:
                out = F.linear(x, *self._fused)
            else:
                return [linear(x) for linear in self.linears]
        elif self.is_packed:
            out = self._packed_product(x)
        elif self.is_fused:
            out = F.linear(x, *self._fused)
        else:
            return [linear(x) for linear in self.linears]
        if len(self.linears) == 1:
            return [out]
        return list(out.split(self.out_features, dim=-1))

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            if x.dim() == 2:
                return self.native(x)
            return self.native(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        weight, bias = self._packed
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def _transposed_product(self, x: torch.Tensor) -> torch.Tensor:
        out_t = torch.ops.mkldnn._linear_pointwise(self._weight, x, None, "none", [], "")
        bias = self.native.bias if self.native is not None else self._packed[1]
        if bias is None:
            return out_t
        return out_t.add_(bias[: self.num_out_features].unsqueeze(1))

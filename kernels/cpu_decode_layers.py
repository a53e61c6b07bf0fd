"""A decode step through every layer in one call of the CPU library: kernels/cpu_decode_layers.cpp.

    layers = DecodeLayers(library, shape, model_tensors, [LayerTensors(...), ...])  # once
    hidden = layers(ids, positions, rows, writes, mirror)   # per step: [B] new tokens -> the
                                                            # hidden states after the final norm

The arithmetic is app/engine/network/model.py's (the tests compare the two step by step); the
step's attention is kernels/cpu_decode_attention.py's, over the thread mirror's rows, with the
same writes (`DecodeRows`, `StepWrites`, built once a step by the CPU backend). The weights are
read where the linears keep them packed (kernels/cpu_linear.py), so the call adds no memory.

The call begins with the tokens' embeddings and the rope tables' rows and ends with the final
norm, so a step makes no torch operation but the output's allocation. Everything the C code
reads unchecked is checked here: the model's tensors once, the step's tensors and the mirror's
shapes each step, and token ids and positions in the C code (an error, nothing written).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from kernels.cpu_decode_attention import DecodeRows, StepWrites, check_mirror_layer
from kernels.cpu_linear import PackedLinear

_P = ctypes.c_void_p


class _Model(ctypes.Structure):  # KvtDecodeModel in cpu_kernels.h
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("hidden", "intermediate", "num_heads")),
        *((name, ctypes.c_int64) for name in ("num_kv_heads", "head_dim", "num_layers")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("vocab_size", ctypes.c_int64),
        ("max_positions", ctypes.c_int64),
        *((name, _P) for name in ("embed", "rope_cos", "rope_sin", "final_norm")),
    ]


class _Layer(ctypes.Structure):  # KvtDecodeLayer
    _fields_ = [
        (name, _P)
        for name in (
            *("input_norm", "post_norm", "q_norm", "k_norm"),
            *("wqkv", "bqkv", "wo", "w13", "w2", "pool_k", "pool_v"),
        )
    ]


class _Step(ctypes.Structure):  # KvtDecodeStep
    _fields_ = [
        ("batch", ctypes.c_int64),
        *((name, _P) for name in ("ids", "positions", "rows", "lens", "slots")),
        *((name, _P) for name in ("copy_rows", "copy_positions", "copy_slots")),
        ("num_copies", ctypes.c_int64),
        ("mirror_k", _P),
        ("mirror_v", _P),
        ("row_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("num_threads", ctypes.c_int),
    ]


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float  # attention's, head_dim ** -0.5 for these models


@dataclass(frozen=True)
class ModelTensors:
    """What the step begins and ends with (float32 on the CPU, contiguous)."""

    embed: torch.Tensor  # [vocab, hidden]
    rope_cos: torch.Tensor  # [max_positions, head_dim], rows by position
    rope_sin: torch.Tensor
    final_norm: torch.Tensor  # [hidden]


@dataclass(frozen=True)
class LayerTensors:
    """One layer as the C code reads it (float32 on the CPU, contiguous)."""

    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    q_norm: torch.Tensor | None  # [head_dim] (Qwen3), or None with k_norm
    k_norm: torch.Tensor | None
    wqkv: PackedLinear  # q, k, v as one weight (and bias)
    wo: PackedLinear
    w13: PackedLinear  # gate, up as one weight
    w2: PackedLinear
    pool_k: torch.Tensor  # [N, bs, Hkv, D] this layer's pool
    pool_v: torch.Tensor


class DecodeLayers:
    """The layers' tensors as the library's structs (built and checked once), and the call."""

    def __init__(
        self,
        library: ctypes.CDLL,
        shape: ModelShape,
        model: ModelTensors,
        layers: list[LayerTensors],
    ) -> None:
        if not layers:
            raise ValueError("no layers")
        # The tensors stay alive as long as the structs that point at them.
        self.shape, self.model, self.layers = shape, model, layers
        _check_model(model, shape)
        for i, layer in enumerate(layers):
            _check_layer(i, layer, shape)
            if layer.pool_k.shape != layers[0].pool_k.shape:
                raise ValueError(f"layer {i}'s pool is not layer 0's shape")
        self.num_slots = layers[0].pool_k.shape[0] * layers[0].pool_k.shape[1]
        self._model = _Model(
            shape.hidden,
            shape.intermediate,
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            len(layers),
            shape.eps,
            shape.scale,
            model.embed.shape[0],
            model.rope_cos.shape[0],
            model.embed.data_ptr(),
            model.rope_cos.data_ptr(),
            model.rope_sin.data_ptr(),
            model.final_norm.data_ptr(),
        )
        self._layers = (_Layer * len(layers))(*(_layer_struct(layer) for layer in layers))
        self._mirror_k = (_P * len(layers))()
        self._mirror_v = (_P * len(layers))()
        self._run = library.kvt_decode_layers_f32
        self._run.restype = ctypes.c_int
        self._run.argtypes = [_P, _P, _P, _P]

    def __call__(
        self,
        ids: torch.Tensor,  # [B] int64, each sequence's new token
        positions: torch.Tensor,  # [B] int64, its position
        rows: DecodeRows,
        writes: StepWrites,
        mirror: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [R, Hkv, capacity, D]
    ) -> torch.Tensor:
        """The step's hidden states after the final norm, [B, hidden] (as CausalLM.forward)."""
        shape = self.shape
        batch = ids.shape[0] if ids.dim() == 1 else -1
        for name, tensor in (("ids", ids), ("positions", positions)):
            if (
                tensor.dtype != torch.int64
                or tensor.device.type != "cpu"
                or tuple(tensor.shape) != (batch,)
                or not tensor.is_contiguous()
            ):
                raise ValueError(f"{name} must be contiguous int64 [B] on the CPU, ids' length")
        if rows.num_seqs != batch or writes.slots.numel() != batch:
            raise ValueError(
                f"{batch} tokens, {rows.num_seqs} sequences, {writes.slots.numel()} slots"
            )
        if writes.num_slots != self.num_slots:
            raise ValueError(
                f"the step writes {writes.num_slots} slots, the pool has {self.num_slots}"
            )
        if rows.max_row >= writes.num_rows or rows.max_len > writes.capacity:
            raise ValueError(
                f"row {rows.max_row} or {rows.max_len} keys past the mirror's "
                f"{writes.num_rows} rows of {writes.capacity}"
            )
        if len(mirror) != len(self.layers):
            raise ValueError(f"{len(mirror)} mirror layers for {len(self.layers)} layers")
        want = (writes.num_rows, shape.num_kv_heads, writes.capacity, shape.head_dim)
        strides = mirror[0][0].stride()
        for i, (keys, values) in enumerate(mirror):
            names = (f"mirror layer {i} keys", f"mirror layer {i} values")
            check_mirror_layer(keys, values, want, names)
            if keys.stride() != strides:  # the C code takes one row and head stride for all
                raise ValueError(f"mirror layer {i} strides {keys.stride()}, layer 0's {strides}")
            self._mirror_k[i] = keys.data_ptr()
            self._mirror_v[i] = values.data_ptr()
        step = _Step(
            batch,
            ids.data_ptr(),
            positions.data_ptr(),
            ctypes.addressof(rows.rows),
            ctypes.addressof(rows.lens),
            writes.slots.data_ptr(),
            writes.copy_rows.data_ptr(),
            writes.copy_positions.data_ptr(),
            writes.copy_slots.data_ptr(),
            writes.copy_rows.numel(),
            ctypes.addressof(self._mirror_k),
            ctypes.addressof(self._mirror_v),
            strides[0],
            strides[1],
            torch.get_num_threads(),
        )
        out = torch.empty(batch, shape.hidden)
        ran = self._run(ctypes.byref(self._model), self._layers, ctypes.byref(step), out.data_ptr())
        if ran == 1:
            return out
        if ran == -1:
            raise ValueError(f"a token id past the vocabulary of {self.model.embed.shape[0]}")
        if ran == -2:
            raise ValueError(f"a position past the rope tables' {self.model.rope_cos.shape[0]}")
        raise ValueError(f"decode attention is not built for head_dim {shape.head_dim}")


def _check_model(model: ModelTensors, shape: ModelShape) -> None:
    tensors = (
        ("embed", model.embed, (model.embed.shape[0], shape.hidden)),
        ("rope_cos", model.rope_cos, (model.rope_cos.shape[0], shape.head_dim)),
        ("rope_sin", model.rope_sin, tuple(model.rope_cos.shape)),
        ("final_norm", model.final_norm, (shape.hidden,)),
    )
    for name, tensor, want in tensors:
        if (
            tensor.dtype != torch.float32
            or tensor.device.type != "cpu"
            or tensor.dim() != len(want)
            or tuple(tensor.shape) != want
            or not tensor.is_contiguous()
        ):
            raise ValueError(f"{name} must be contiguous float32 {list(want)} on the CPU")


def _check_layer(index: int, layer: LayerTensors, shape: ModelShape) -> None:
    hidden, dim = shape.hidden, shape.head_dim
    q_width = shape.num_heads * dim
    qkv_width = q_width + 2 * shape.num_kv_heads * dim
    vectors = [("input_norm", layer.input_norm, hidden), ("post_norm", layer.post_norm, hidden)]
    if (layer.q_norm is None) != (layer.k_norm is None):
        raise ValueError(f"layer {index}: q_norm and k_norm go together")
    if layer.q_norm is not None:
        vectors += [("q_norm", layer.q_norm, dim), ("k_norm", layer.k_norm, dim)]
    for name, tensor, size in vectors:
        if (
            tensor.dtype != torch.float32
            or tensor.device.type != "cpu"
            or tuple(tensor.shape) != (size,)
            or not tensor.is_contiguous()
        ):
            raise ValueError(f"layer {index}: {name} must be contiguous float32 [{size}]")
    linears = (
        ("wqkv", layer.wqkv, hidden, qkv_width),
        ("wo", layer.wo, q_width, hidden),
        ("w13", layer.w13, hidden, 2 * shape.intermediate),
        ("w2", layer.w2, shape.intermediate, hidden),
    )
    for name, linear, in_features, out_features in linears:
        if (linear.in_features, linear.out_features) != (in_features, out_features):
            raise ValueError(
                f"layer {index}: {name} is [{linear.out_features}, {linear.in_features}], "
                f"not [{out_features}, {in_features}]"
            )
        if linear.bias is not None and name != "wqkv":
            raise ValueError(f"layer {index}: {name} has a bias, which the C code does not add")
    pool_shape = layer.pool_k.shape
    for name, pool in (("pool_k", layer.pool_k), ("pool_v", layer.pool_v)):
        if (
            pool.dtype != torch.float32
            or pool.dim() != 4
            or pool.shape != pool_shape
            or tuple(pool.shape[2:]) != (shape.num_kv_heads, dim)
            or not pool.is_contiguous()
        ):
            raise ValueError(f"layer {index}: {name} must be contiguous float32 [N, bs, Hkv, D]")


def _layer_struct(layer: LayerTensors) -> _Layer:
    def pointer(tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else tensor.data_ptr()

    return _Layer(
        pointer(layer.input_norm),
        pointer(layer.post_norm),
        pointer(layer.q_norm),
        pointer(layer.k_norm),
        pointer(layer.wqkv.packed),
        pointer(layer.wqkv.bias),
        pointer(layer.wo.packed),
        pointer(layer.w13.packed),
        pointer(layer.w2.packed),
        pointer(layer.pool_k),
        pointer(layer.pool_v),
    )

"""CPU decode attention over the thread mirror's rows: a small C++ kernel, built on first use.

    kernel = load_decode_attention()          # None where no compiler built it (callers fall back)
    rows = DecodeRows([3, 0, 1], [812, 40, 1530])     # once a step: each sequence's row, length
    out = kernel(q, keys, values, rows, scale)        # per layer: q [B, Hq, D] -> [B, Hq, D]
    kernel.store_and_sync(key, value, pool_k, pool_v, writes, keys, values)  # a step's writes

`keys`/`values` are one layer of the mirror, [R, Hkv, capacity, D] float32, contiguous in D.
Sequence b reads the first lens[b] keys of row rows[b]; the reference is
`app/engine/network/attention/cpu_backend.decode_attention` over those keys (the tests compare
them). Why a kernel and how it splits the work: kernels/cpu_decode_attention.cpp.

`store_and_sync` does a mirror step's writes in one call per layer: the new tokens into their
pool slots, then the positions the rows lack copied from the pool (`StepWrites`, checked once a
step). As torch operations (store_kv_ref, then MirrorStep.sync_layer, the reference) those were a
dozen dispatches per layer; one call made decode steps ~2.7% faster (batch 1 and 4, 1,500 tokens).

Built with the rest of the CPU library (kernels/cpu_library.py); where it cannot be built,
`load_decode_attention` logs why and returns None, and callers keep torch's products.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels.cpu_library import load_cpu_library


class DecodeRows:
    """One step's decodes as the kernel reads them: each sequence's mirror row and number of
    keys, as C arrays built once a step (every layer reuses them)."""

    def __init__(self, rows: list[int], lens: list[int]) -> None:
        if len(rows) != len(lens) or not rows:
            raise ValueError(f"rows and lens must be one non-empty length, got {rows}, {lens}")
        if min(rows) < 0 or min(lens) < 1:
            raise ValueError(f"rows must be >= 0 and lens >= 1, got {rows}, {lens}")
        self.num_seqs = len(rows)
        self.max_row = max(rows)
        self.max_len = max(lens)
        self.rows = (ctypes.c_int64 * len(rows))(*rows)
        self.lens = (ctypes.c_int64 * len(lens))(*lens)


class StepWrites:
    """One step's writes for `store_and_sync`, checked once a step (every layer repeats them):
    the new tokens' pool slots, and the positions each mirror row lacks, with the pool slot each
    is copied from. All int64 tensors on the CPU (the C code reads them as they are)."""

    def __init__(
        self,
        slots: torch.Tensor,  # [T] the step's new tokens' slots (negative: padding)
        copy_rows: torch.Tensor,  # [n]
        copy_positions: torch.Tensor,  # [n]
        copy_slots: torch.Tensor,  # [n]
        *,
        num_slots: int,  # the pool's N * bs
        num_rows: int,  # the mirror's rows ...
        capacity: int,  # ... and positions per row
    ) -> None:
        tensors = (slots, copy_rows, copy_positions, copy_slots)
        if any(t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != 1 for t in tensors):
            raise ValueError("slots and copies must be 1-d int64 tensors on the CPU")
        if not (copy_rows.numel() == copy_positions.numel() == copy_slots.numel()):
            raise ValueError("copy_rows, copy_positions and copy_slots must be one length")
        self.slots, self.copy_rows, self.copy_positions, self.copy_slots = (
            t.contiguous() for t in tensors
        )
        bounds = ((self.slots, num_slots), (self.copy_slots, num_slots))
        bounds += ((self.copy_rows, num_rows), (self.copy_positions, capacity))
        for values, limit in bounds:
            if values.numel() and int(values.max()) >= limit:
                raise ValueError(f"an index reaches {int(values.max())}, past {limit - 1}")
        if self.copy_slots.numel() and int(self.copy_slots.min()) < 0:
            raise ValueError("a copy from a negative slot")
        if self.copy_rows.numel() and min(int(self.copy_rows.min()), int(copy_positions.min())) < 0:
            raise ValueError("a copy to a negative row or position")
        self.num_slots, self.num_rows, self.capacity = num_slots, num_rows, capacity


class DecodeAttentionKernel:
    """The loaded library's entry points with their argument checks."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._store_and_sync = library.kvt_store_and_sync_f32
        self._store_and_sync.restype = None
        self._store_and_sync.argtypes = [
            *(ctypes.c_void_p,) * 2,
            *(ctypes.c_int64,) * 2,
            ctypes.c_void_p,
            ctypes.c_int64,
            *(ctypes.c_void_p,) * 5,
            ctypes.c_int64,
            *(ctypes.c_void_p,) * 2,
            *(ctypes.c_int64,) * 4,
        ]
        self._run = library.kvt_decode_attention_f32
        self._run.restype = ctypes.c_int
        self._run.argtypes = [
            *(ctypes.c_void_p,) * 6,
            *(ctypes.c_int64,) * 7,
            ctypes.c_float,
            ctypes.c_int,
        ]
        self._supports = library.kvt_decode_attention_supports
        self._supports.restype = ctypes.c_int
        self._supports.argtypes = [ctypes.c_int64]

    def store_and_sync(
        self,
        key: torch.Tensor | None,  # [T, Hkv, D] the step's new keys; None: nothing to store
        value: torch.Tensor | None,
        pool_k: torch.Tensor,  # [N, bs, Hkv, D] one layer of the pool
        pool_v: torch.Tensor,
        writes: StepWrites,
        mirror_k: torch.Tensor,  # [R, Hkv, capacity, D] the same layer of the mirror
        mirror_v: torch.Tensor,
    ) -> None:
        """The new keys and values into their pool slots, then the positions the mirror's rows
        lack copied from the pool (kernels/store_kv_ref.py, then MirrorStep.sync_layer)."""
        num_kv_heads, head_dim = pool_k.shape[2:]
        for name, tensor in (("pool_k", pool_k), ("pool_v", pool_v)):
            if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.dim() != 4:
                raise ValueError(f"{name} must be a contiguous float32 [N, bs, Hkv, D] pool")
        if pool_v.shape != pool_k.shape or pool_k.shape[0] * pool_k.shape[1] != writes.num_slots:
            raise ValueError(f"pools {tuple(pool_k.shape)} do not fit the step's slots")
        mirror_shape = (writes.num_rows, num_kv_heads, writes.capacity, head_dim)
        check_mirror_layer(mirror_k, mirror_v, mirror_shape)
        num_tokens, key_stride, value_stride = 0, 0, 0
        if key is not None and value is not None:
            for name, tensor in (("key", key), ("value", value)):
                if (
                    tensor.dtype != torch.float32
                    or tuple(tensor.shape) != (writes.slots.numel(), num_kv_heads, head_dim)
                    or tensor.stride()[1:] != (head_dim, 1)
                ):
                    raise ValueError(
                        f"{name} must be float32 [T, Hkv, D] with each token's heads "
                        f"contiguous, got {tuple(tensor.shape)} strides {tensor.stride()}"
                    )
            num_tokens, key_stride, value_stride = key.shape[0], key.stride(0), value.stride(0)
        self._store_and_sync(
            key.data_ptr() if num_tokens else None,
            value.data_ptr() if num_tokens else None,
            key_stride,
            value_stride,
            writes.slots.data_ptr(),
            num_tokens,
            pool_k.data_ptr(),
            pool_v.data_ptr(),
            writes.copy_rows.data_ptr(),
            writes.copy_positions.data_ptr(),
            writes.copy_slots.data_ptr(),
            writes.copy_rows.numel(),
            mirror_k.data_ptr(),
            mirror_v.data_ptr(),
            num_kv_heads,
            head_dim,
            mirror_k.stride(0),
            mirror_k.stride(1),
        )

    def supports(self, head_dim: int) -> bool:
        """Whether the kernel is built for this head size."""
        return bool(self._supports(head_dim))

    def __call__(
        self,
        q: torch.Tensor,  # [B, Hq, D]
        keys: torch.Tensor,  # [R, Hkv, capacity, D]
        values: torch.Tensor,
        rows: DecodeRows,
        scale: float,
    ) -> torch.Tensor:
        _check(q, keys, values, rows)
        batch, num_heads, head_dim = q.shape
        num_kv_heads = keys.shape[1]
        q = q.contiguous()
        out = torch.empty_like(q)
        ran = self._run(
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            ctypes.addressof(rows.rows),
            ctypes.addressof(rows.lens),
            out.data_ptr(),
            batch,
            num_heads,
            num_kv_heads,
            head_dim,
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            scale,
            torch.get_num_threads(),
        )
        if not ran:
            raise ValueError(
                f"the kernel is not built for head_dim {head_dim} (ask `supports` first)"
            )
        return out


def check_mirror_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int, int, int],
    names: tuple[str, str] = ("mirror_k", "mirror_v"),
) -> None:
    """What the library's writes (store_and_sync, the fused layers) trust of one layer of the
    mirror, which they address by its row and head strides: float32 on the CPU, `shape` [R, Hkv,
    capacity, D], keys and values strided alike, each head's positions contiguous."""
    for name, tensor in zip(names, (keys, values), strict=True):
        if (
            tensor.dtype != torch.float32
            or tensor.device.type != "cpu"
            or tuple(tensor.shape) != shape
        ):
            raise ValueError(
                f"{name} must be float32 {shape} on the CPU, got {tensor.dtype} "
                f"{tuple(tensor.shape)} on {tensor.device}"
            )
    if values.stride() != keys.stride() or keys.stride()[2:] != (shape[3], 1):
        raise ValueError(
            f"{names[0]} / {names[1]} strides {keys.stride()} / {values.stride()}: must be alike, "
            f"each head's positions contiguous"
        )


def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: DecodeRows) -> None:
    """Everything the C code trusts: it reads memory by these shapes and strides unchecked."""
    for name, tensor in (("q", q), ("keys", keys), ("values", values)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(
                f"{name} must be float32 on the CPU, got {tensor.dtype} on {tensor.device}"
            )
    if q.dim() != 3 or keys.dim() != 4:
        raise ValueError(
            f"q must be [B, Hq, D] and keys [R, Hkv, capacity, D], got {tuple(q.shape)} "
            f"and {tuple(keys.shape)}"
        )
    if values.shape != keys.shape or values.stride() != keys.stride():
        raise ValueError(
            f"values must have the keys' shape and strides, got {tuple(values.shape)} "
            f"{values.stride()} and {tuple(keys.shape)} {keys.stride()}"
        )
    num_rows, num_kv_heads, capacity, head_dim = keys.shape
    if keys.stride(3) != 1 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit keys {tuple(keys.shape)} (strides {keys.stride()})"
        )
    if q.shape[0] != rows.num_seqs or rows.max_row >= num_rows or rows.max_len > capacity:
        raise ValueError(
            f"{rows.num_seqs} sequences up to row {rows.max_row} and {rows.max_len} keys do not "
            f"fit q {tuple(q.shape)} and keys {tuple(keys.shape)}"
        )


def load_decode_attention() -> DecodeAttentionKernel | None:
    """The kernel, from the CPU library; None where that could not be built or is off."""
    library = load_cpu_library()
    return None if library is None else _kernel(library)


@functools.cache
def _kernel(library: ctypes.CDLL) -> DecodeAttentionKernel:
    return DecodeAttentionKernel(library)

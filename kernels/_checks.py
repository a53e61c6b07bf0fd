"""Argument checks shared by the kernel launchers.

A Triton kernel trusts its pointers and strides: a wrong shape or dtype reads or writes the wrong
memory without a word. The launchers therefore check everything that can be checked on the host,
without a device sync, and raise ValueError naming the argument.
"""

from __future__ import annotations

import contextlib

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Launch under the tensor's device: Triton launches on the *current* CUDA device, which on
    a multi-GPU host need not be the one the tensors live on."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def require_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def require_dtype(name: str, tensor: torch.Tensor, *dtypes: torch.dtype) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}, got {tensor.dtype}")


def require_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    return first


def require_unit_last_stride(name: str, tensor: torch.Tensor) -> None:
    # A size-1 last dim has an arbitrary stride that is never used.
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dim, got strides {tuple(tensor.stride())}"
        )


def require_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got shape {tuple(tensor.shape)} "
            f"strides {tuple(tensor.stride())}"
        )


def require_kv_pool(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache and v_cache: one layer of the pool, [num_blocks, block_size, Hkv, D], contiguous."""
    require_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    require_ndim("v_cache", v_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    require_dtype("k_cache", k_cache, *KERNEL_DTYPES)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must have one dtype, got {k_cache.dtype} and {v_cache.dtype}"
        )
    require_contiguous("k_cache", k_cache)
    require_contiguous("v_cache", v_cache)


def require_launchable(kernel: object, device: torch.device) -> None:
    """A compiled kernel runs on CUDA; on any other device only a kernel that was defined under
    Triton's interpreter (TRITON_INTERPRET=1 before kernels/ is imported) runs, slowly: the CPU
    tests of the Triton path."""
    if device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise ValueError(
            f"the Triton kernels run on CUDA, got tensors on {device}: on the CPU they run only "
            "under Triton's interpreter, with TRITON_INTERPRET=1 set before kernels/ is imported"
        )

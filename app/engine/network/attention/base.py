"""Attention over the paged KV pool: the step's metadata, the backend interface, the choice.

Per step, the model runner builds one AttentionMetadata and hands it to the backend's `prepare`
with the same values as plain ints (the backend keeps whatever per-step extras it derives from
them); every layer then calls `store_kv` for its new keys/values and `forward` for its queries;
once the forward pass has finished, the runner calls `finish_step`.

    attn = create_backend(kv_caches)            # by the pool's device: cuda -> Triton, else torch
    attn = create_backend(kv_caches, "triton")  # by name (on a CPU pool: Triton's interpreter)
    attn.prepare(meta, seq_ids=..., cu_seqlens_q=[...], seq_lens=[...], owners=StepOwners(...))
    hidden = model(input_ids, positions, kv_caches, meta, attn)
    attn.finish_step()
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)


@dataclass
class AttentionMetadata:
    """Where one step's tokens go in the pool and what each sequence attends to (on the model's
    device; every backend reads all of it)."""

    slot_mapping: torch.Tensor  # [T] int64, pool slot of each new token (-1: padding, skipped)
    block_tables: torch.Tensor  # [B, M] int32, padded with 0 past each sequence's blocks
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's queries in the batch
    seq_lens: torch.Tensor  # [B] int32, KV length after this step (cached + new)
    max_seqlen_q: int
    max_seqlen_k: int
    # Recorded once and replayed with other values (a CUDA graph): the launch choices must hold
    # for any KV length up to max_seqlen_k, not only for this step's.
    replayed: bool = False


@dataclass(frozen=True)
class StepOwners:
    """Whose KV a step's sequences are, for a backend that keeps copies of it across steps (the
    CPU backend's mirror): on the host, per sequence of the step."""

    thread_keys: tuple[Hashable, ...]  # the thread each sequence continues
    block_tables: Sequence[list[int]]  # its pool blocks (the KV manager's lists; read only)
    block_generations: Sequence[int]  # per pool block, its allocations (BlockPool.generations)


class AttentionBackend(ABC):
    """One device's attention: stores the step's keys/values in the pool and attends over it."""

    # True where store_kv/forward read the step's metadata tensors and nothing `prepare` kept:
    # such a backend can be recorded in a CUDA graph and replayed on other metadata values.
    reads_metadata_only = False

    @abstractmethod
    def prepare(
        self,
        meta: AttentionMetadata,
        *,
        seq_ids: tuple[int, ...],
        cu_seqlens_q: list[int],
        seq_lens: list[int],
        owners: StepOwners | None = None,
    ) -> None:
        """Called once a step before the forward pass: `meta` and its values on the host (the
        batch's sequence ids, query offsets and KV lengths), for the extras a backend keeps;
        `owners` where the caller knows the sequences' threads and blocks (the engine)."""

    @abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,
        k_cache: torch.Tensor,  # [N, bs, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int,
    ) -> torch.Tensor:
        """Attention of the step's queries over the pool of `layer` (its index in the model),
        which already holds the step's new keys and values. Returns [T, Hq, D]."""

    @abstractmethod
    def finish_step(self) -> None:
        """The step's forward pass finished (a pass that raised half way never gets here)."""

    def warm_up(self, num_heads: int, max_model_len: int) -> int:
        """Compile ahead whatever the backend would otherwise compile on first use, for queries
        of `num_heads` heads and contexts up to max_model_len. Returns the number of compiled
        variants launched (0: nothing to compile)."""
        return 0


# backend name -> "module:class" in this package, imported on first use: the Triton kernels (and
# triton) load only where they serve. "torch" (the pure-torch references) serves any device.
BACKENDS = {"triton": "triton_backend:TritonBackend", "torch": "cpu_backend:CPUBackend"}
# device type -> its backend when none is named; any other device gets DEFAULT_BACKEND.
DEVICE_BACKENDS = {"cuda": "triton"}
DEFAULT_BACKEND = "torch"


def backend_name(device: torch.device, name: str | None = None) -> str:
    """The backend `create_backend` builds for a pool on `device`: `name`, checked, or the
    device's own."""
    if name is None:
        return DEVICE_BACKENDS.get(device.type, DEFAULT_BACKEND)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (one of {', '.join(BACKENDS)})")
    return name


def create_backend(kv_caches: KVCaches, name: str | None = None) -> AttentionBackend:
    """A fresh backend (with its own step state) for the pool `kv_caches`: the one called `name`,
    or with None the one of the pool's device. "triton" on a pool off CUDA runs only where the
    kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 before kernels/ is
    imported; the tests of the Triton path on the CPU), and says so otherwise."""
    chosen = backend_name(kv_caches[0][0].device, name)
    module_name, class_name = BACKENDS[chosen].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)(kv_caches)

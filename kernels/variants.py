"""Which compiled variants of the kernels the launchers ask for: a registry, and its key.

Triton compiles one binary per set of compile-time constants (and launch options) on its first
launch, 0.4-1.6 s each on a GPU. The engine warms up every variant it can choose before it
serves (`app/engine/network/attention/triton_backend.py`); this registry lets a test prove that
a turn afterwards asks for no variant the warm-up did not compile. It is the interpreter's
stand-in for Triton's compile hook, which never fires under TRITON_INTERPRET=1.

    variant = Variant.of("paged_attention", {"HEAD_DIM": 128, ...}, num_warps=4, num_stages=3)
    record(variant)         # the launcher, on every launch: a set insert
    used()                  # every variant launched since the last reset()

Each kernel file lists the variants its launcher can choose for a model and a device
(`paged_attention_variants`, `store_kv_variants`): the warm-up launches them and the
ahead-of-time compile test (tests/kernels/test_aot_compile.py) compiles them for sm_80/sm_90.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One compiled binary of one kernel: its constexprs and launch options, hashable."""

    kernel: str
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def of(cls, kernel: str, constexprs: dict[str, Any], **options: int) -> Variant:
        return cls(kernel, tuple(sorted(constexprs.items())), **options)

    @property
    def constants(self) -> dict[str, Any]:
        return dict(self.constexprs)


_lock = threading.Lock()
_used: set[Variant] = set()


def record(variant: Variant) -> None:
    with _lock:
        _used.add(variant)


def used() -> frozenset[Variant]:
    with _lock:
        return frozenset(_used)


def reset() -> None:
    with _lock:
        _used.clear()

"""Ahead-of-time compiles of the kernels' variants for a GPU target, on any machine.

Triton compiles for a stand-in target (`GPUTarget("cuda", 90, 32)`) down to a cubin with the
ptxas it ships: no GPU needed. `cuobjdump --dump-resource-usage` then reads the cubin's
registers, stack frame and shared memory. A variant fails when it does not compile, when a
16-bit variant spills registers (stores to local memory in its SASS), or when it needs more shared
memory than the target has per block.

    jobs = [(variant, "bf16", 90) for variant in ...]    # kernels.variants.Variant
    for described, problem in compile_all(jobs): ...      # problem None: fine

Pointers and specialized strides are compiled 16-divisible, as the JIT specializes them for the
pool's layout (every head size the engine serves is a multiple of 16). The compiles run in
processes started fresh (spawn) with TRITON_INTERPRET=0, so a caller under the interpreter
(tests/kernels) still gets real compiles.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

from kernels.variants import Variant

SHARED_MEMORY_PER_BLOCK = {80: 164 * 1024, 90: 228 * 1024}  # compute capability -> bytes
_INT_POINTERS = {
    "block_tables_ptr": "*i32",
    "cu_seqlens_q_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "slot_mapping_ptr": "*i64",
    "split_out_ptr": "*fp32",
    "split_lse_ptr": "*fp32",
}
_NEVER_SPECIALIZED = {"num_slots", "num_splits"}  # values that are never 16-divisible in use

Job = tuple[Variant, str, int]  # variant, element type ("bf16", "fp16", "fp32"), sm


def nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def can_compile() -> bool:
    """Whether Triton's NVIDIA backend and its tools are installed here."""
    try:
        return all(os.access(nvidia_tool(t), os.X_OK) for t in ("ptxas", "cuobjdump"))
    except ImportError:
        return False


def _kernel(name: str):
    from kernels.paged_attention import _combine_splits_kernel, _paged_attention_kernel
    from kernels.store_kv import _store_kv_kernel

    return {
        "paged_attention": _paged_attention_kernel,
        "combine_splits": _combine_splits_kernel,
        "store_kv": _store_kv_kernel,
    }[name]


def _signature(kernel, dtype: str) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(kernel.arg_names):
        if kernel.params[index].is_constexpr:
            signature[name] = "constexpr"
            continue
        if name in _INT_POINTERS:
            signature[name] = _INT_POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        specialized = not kernel.params[index].do_not_specialize and name not in _NEVER_SPECIALIZED
        if signature[name].startswith("*") or (specialized and name.startswith("stride")):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the cubin's kernel, and SPILLS: its local-memory
    stores (STL) in the SASS. A small stack frame alone is not a spill; STL is."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = nvidia_tool("cuobjdump")
        usage = subprocess.run(
            [tool, "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [tool, "--dump-sass", f.name], check=True, capture_output=True, text=True
        ).stdout
    found = {key: int(value) for key, value in re.findall(r"\b([A-Z]+):(\d+)", usage)}
    found["SPILLS"] = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
    return found


def compile_variant(job: Job) -> tuple[str, str | None]:
    """(description, None) when the variant compiles cleanly, else (description, the problem)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, dtype, arch = job
    kernel = _kernel(variant.kernel)
    described = f"{variant.kernel} {dtype} sm_{arch} {variant.constants}"
    signature, attrs = _signature(kernel, dtype)
    try:
        compiled = triton.compile(
            ASTSource(kernel, signature, variant.constants, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
    except Exception as exc:  # noqa: BLE001 - any compile failure is the finding
        return described, f"does not compile: {type(exc).__name__}: {str(exc)[:2000]}"
    usage = resource_usage(compiled.asm["cubin"])
    shared = max(compiled.metadata.shared, usage.get("SHARED", 0))
    if shared > SHARED_MEMORY_PER_BLOCK[arch]:
        limit = SHARED_MEMORY_PER_BLOCK[arch]
        return described, f"needs {shared} bytes of shared memory; sm_{arch} has {limit}"
    if dtype != "fp32" and usage["SPILLS"]:
        return described, f"spills registers: {usage}"
    return described, None


def compile_all(jobs: Iterable[Job], workers: int | None = None) -> list[tuple[str, str | None]]:
    """compile_variant over every job, in fresh processes (one per CPU core by default)."""
    jobs = list(jobs)
    workers = workers or len(os.sched_getaffinity(0))
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the spawned workers
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(compile_variant, jobs))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved

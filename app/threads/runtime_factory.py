"""Build the model runtime (loaded model + AsyncLLMEngine) from settings, for the app's lifespan.

torch is imported here only inside the function, so importing the app (and the API layer) does
not pull it in; the model loads once, when the app starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from app.config import Settings
from app.threads.ports import ModelRuntime

T = TypeVar("T")

log = logging.getLogger(__name__)


MAX_AUTO_HOST_MB = 8192
MAX_AUTO_DISK_MB = 16384


def tier_budgets(settings: Settings, pool_mb: int) -> tuple[int, Path, int]:
    """(host MB, disk folder, disk MB) of the KV tiers. Unset budgets suit the machine: host
    memory 4x the KV pool (pool_mb), at most a quarter of the RAM (and 8 GiB); disk a quarter of the free
    space where the snapshots go, at most 16 GiB."""
    folder = settings.disk_cache_dir or settings.data_dir / "kv"
    host = settings.host_cache_mb
    if host is None:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        host = min(4 * pool_mb, ram_mb // 4, MAX_AUTO_HOST_MB)
    disk = settings.disk_cache_mb
    if disk is None:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        disk = min(shutil.disk_usage(existing).free // 2**20 // 4, MAX_AUTO_DISK_MB)
    return host, folder, disk


def build_runtime_in_own_thread(settings: Settings) -> ModelRuntime:
    """build_runtime in a thread of its own that ends with it (call_in_own_thread says why)."""
    return call_in_own_thread(lambda: build_runtime(settings), name="kvthreads-load")


def call_in_own_thread(fn: Callable[[], T], name: str) -> T:
    """fn() in a thread of its own that ends with it, so that only the engine's thread keeps a
    team of OpenMP workers. GNU OpenMP (torch's on the CPU) keeps one for every thread that ever
    ran a parallel region; with the loading thread's team alive beside the engine's, it counts
    more worker threads than cores and stops spin-waiting between parallel regions, so every
    region of an engine step pays a wake-up: a batch-1 decode step of the 83M built-in took
    15.5 ms on 2 cores, against 9.0 ms with the model loaded in a thread that ended. fn's
    exception is raised here."""
    import threading

    result: list[T] = []
    error: list[BaseException] = []

    def call() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=call, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def build_runtime(settings: Settings) -> ModelRuntime:
    """Load the configured model and start an engine on it (blocking: seconds for big models)."""
    import os

    import torch

    from app.engine.loading.loader import resolve_model
    from app.engine.network.kv_pool import plan_for_model
    from app.engine.runtime.async_engine import AsyncLLMEngine
    from kernels.cpu_library import set_enabled as use_cpu_kernels

    use_cpu_kernels(settings.cpu_kernels)  # read when the engine is built (packing, backend)
    if settings.compile:  # compiled decode steps persist between runs (not a setting of ours)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "inductor"))
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    loaded = resolve_model(settings.model, settings.device, dtype, data_dir=settings.data_dir)
    plan = plan_for_model(
        loaded.model,
        block_size=settings.block_size,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_mb=settings.kv_cache_mb,
        max_batch_tokens=settings.max_batch_tokens,
        memory_utilization=settings.gpu_memory_utilization,
    )
    host_mb, disk_dir, disk_mb = tier_budgets(settings, plan.pool_bytes // 2**20)
    engine = AsyncLLMEngine.from_loaded(
        loaded,
        num_blocks=plan.num_blocks,
        block_size=settings.block_size,
        max_batch_tokens=plan.max_batch_tokens,
        max_num_seqs=settings.max_num_seqs,
        residency=settings.residency,
        compile_decode=settings.compile,
        cuda_graphs=None if settings.cuda_graphs else False,
        host_cache_mb=host_mb,
        disk_cache_dir=disk_dir if disk_mb else None,
        disk_cache_mb=disk_mb,
    )
    log.info(
        "model %s on %s (%s), context %d tokens, %s, host tier %d MB, disk tier %d MB in %s",
        loaded.name,
        loaded.device,
        loaded.dtype,
        loaded.max_context_length,
        plan.describe(),
        host_mb,
        disk_mb,
        disk_dir,
    )
    started = time.perf_counter()
    num_variants = engine.engine.warm_up()
    log.info(
        "warm-up: %d kernel variants compiled in %.1f s",
        num_variants,
        time.perf_counter() - started,
    )
    engine.on_fatal = _exit_after_fault
    engine.start()
    return runtime_for(
        loaded,
        engine,
        default_max_tokens=settings.default_max_tokens,
        share_across_accounts=settings.share_across_accounts,
    )


EXIT_DEVICE_FAULT = 70  # EX_SOFTWARE: what `kvthreads serve` exits with after a device fault
_fault: list[BaseException] = []


def _exit_after_fault(exc: BaseException) -> None:
    """The engine failed on a device fault: /healthz already says 503; ask the server to stop
    (SIGTERM: uvicorn shuts down gracefully, in-flight turns roll back) and let `serve` exit
    with EXIT_DEVICE_FAULT so a supervisor restarts the process."""
    _fault.append(exc)
    log.critical("device fault: stopping the server for a restart (%s)", exc)
    os.kill(os.getpid(), signal.SIGTERM)


def device_fault() -> BaseException | None:
    """The device fault that stopped this process's engine, if one did."""
    return _fault[0] if _fault else None


def runtime_for(
    loaded: Any,
    engine: Any,
    *,
    default_max_tokens: int = 256,
    share_across_accounts: bool = False,
) -> ModelRuntime:
    """A runtime for an engine built elsewhere on `loaded` (a LoadedModel), e.g. by a test."""
    return ModelRuntime(
        name=loaded.name,
        engine=engine,
        chat_format=loaded.chat_format,
        max_context_tokens=loaded.max_context_length,
        default_max_tokens=default_max_tokens,
        share_across_accounts=share_across_accounts,
    )


@asynccontextmanager
async def open_model_runtime(settings: Settings, given: Any | None) -> AsyncIterator[ModelRuntime]:
    """The runtime the app serves with: the one given (its owner starts and stops it), or one
    built from settings, whose engine is shut down when the app stops (in-flight turns are
    aborted and roll back)."""
    if given is not None:
        if not isinstance(given, ModelRuntime):
            raise TypeError(
                "create_app(runtime=...) takes a ModelRuntime (app.threads.runtime_factory."
                f"runtime_for(loaded, engine)), got {type(given).__name__}"
            )
        yield given
        return
    runtime = await asyncio.to_thread(build_runtime_in_own_thread, settings)
    try:
        yield runtime
    finally:
        await asyncio.to_thread(runtime.engine.shutdown)

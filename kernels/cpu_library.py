"""kvthreads' CPU library: the C++ kernels in kernels/*.cpp, built into one shared object on
first use and loaded through ctypes.

    library = load_cpu_library()   # ctypes.CDLL, or None where no compiler built it
    set_enabled(False)             # the process's switch (KVTHREADS_CPU_KERNELS=off): None from
                                   # then on, for engines built after it

The sources (SOURCES, with cpu_kernels.h, which declares what they call of each other's):
    cpu_linear.cpp            linears over weights packed for streaming (cpu_linear.py)
    cpu_decode_attention.cpp  decode attention over the thread mirror's rows, and a mirror
                              step's writes (cpu_decode_attention.py)
    cpu_decode_layers.cpp     a decode step through every layer in one call (cpu_decode_layers.py)

The build: g++ (or $CXX) with -O3 -march=native -fopenmp, a few seconds, into the user's cache
folder ($XDG_CACHE_HOME, else ~/.cache, then kvthreads/kernels; as torch keeps its extensions
under ~/.cache/torch_extensions) under a name that hashes the sources, the flags, the compiler
and the CPU it was built on (-march=native code must not run on another CPU). Written to a
temporary name and renamed, so concurrent processes never load half a file. Plain C ABI, no torch
headers. A failed build is logged once and callers keep their torch paths: the library is a
speed-up, not a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCES = tuple(
    FOLDER / name
    for name in ("cpu_linear.cpp", "cpu_decode_attention.cpp", "cpu_decode_layers.cpp")
)
HEADERS = (FOLDER / "cpu_kernels.h",)
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",  # resolves at load time to the libgomp.so.1 torch already loaded: one team
    "-fno-math-errno",
    "-std=c++17",
    "-shared",
    "-fPIC",
)
BUILD_TIMEOUT_S = 180


_enabled = True


def set_enabled(enabled: bool) -> None:
    """Whether load_cpu_library gives the library in this process (on by default). Off, every
    user takes its torch or oneDNN path: an operator's way out should the native code ever be
    suspected. Engines built before keep what they loaded."""
    global _enabled
    _enabled = enabled


def load_cpu_library() -> ctypes.CDLL | None:
    """The library, built if this CPU and compiler have no build yet; None where it cannot be
    or is switched off."""
    return _loaded_library() if _enabled else None


@functools.cache
def _loaded_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(built_library()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("CPU kernels unavailable, using torch's operations: %s", exc)
        return None


def built_library() -> Path:
    """The built library's path, building it first where this cache has none."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++, or $CXX)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (" ".join(FLAGS), version, _cpu_identity()):
        digest.update(part.encode())
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folder = Path(cache) / "kvthreads" / "kernels"
    target = folder / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))

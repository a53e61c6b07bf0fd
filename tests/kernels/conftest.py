"""Kernel tests, and the engine through its Triton path, run on the CPU under Triton's interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` kernel is defined, i.e. before kernels.*
is imported: pytest imports this file before the test modules of this folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

"""bench/gpu_check.py needs a GPU for its real run; here it must parse, and its CPU smoke mode
(one tiny case per kernel under the interpreter) must pass."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_help():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "--interpret-smoke" in result.stdout


def test_interpret_smoke_passes():
    result = _run("--interpret-smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| paged_attention | smoke: mixed, 2 splits | float32 |" in result.stdout
    assert "| store_kv |" in result.stdout
    assert "checks passed" in result.stdout

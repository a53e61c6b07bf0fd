"""bench/gpu_suite.py (`make gpu-check`) needs a GPU for its real run; here its CPU smoke mode
runs all four steps (the kernels, the engine through the interpreted Triton path against the
CPU engine, the targets' and the benchmark's tiny modes) and passes."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


def test_interpret_smoke_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--interpret", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "| paged_attention | smoke: mixed, 2 splits | float32 |" in out
    assert "| builtin-tiny-random | cpu, Triton interpreted, float32 |" in out
    assert "| yes | - | yes | yes |" in out  # greedy equal, no divergence, counts equal, ok
    assert "decode: " in out and "tokens/s at concurrency 32" in out
    assert "| 32 | eager |" in out and "| speed-up |" in out  # the targets' tables
    assert out.rstrip().endswith("kernels: ok\nengine: ok\ntargets: ok\nbenchmark: ok")
    assert list(tmp_path.glob("gpu-multiturn-*.json"))
    assert (tmp_path / "gpu-targets.json").exists()

"""bench/gpu_multiturn.py on a CPU: its logic on a tiny model of the same architecture (--tiny).

It was written for an H100/H200 and its full-size run needs one; here it must run end to end,
pass its own checks, and import nothing but torch, the engine and the standard library.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.multiturn.records import RunResult
from bench.multiturn.report import summarize

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_multiturn.py"


def test_gpu_script_imports_no_web_or_tokenizer_package():
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
        "bad = {'httpx', 'msgspec', 'litestar', 'sqlalchemy', 'asyncpg', 'tokenizers', "
        "'safetensors', 'jinja2', 'transformers', 'matplotlib'} "
        "& {m.split('.')[0] for m in sys.modules}; print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_gpu_script_runs_both_modes_on_a_tiny_model(tmp_path, capsys):
    from bench import gpu_multiturn

    code = gpu_multiturn.main(
        ["--tiny", "--device", "cpu", "--profiles", "chat,pressure", "--scale", "0.5",
         "--reply-scale", "0.05", "--concurrency", "1", "--decode-tokens", "4",
         "--out", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "## chat" in printed and "## pressure" in printed
    assert "tokens/s at concurrency 1 " in printed and "tokens/s at concurrency 32 " in printed

    data = json.loads(next(tmp_path.glob("gpu-multiturn-*.json")).read_text())
    runs = {(r["profile"], r["mode"]): RunResult.from_json(r) for r in data["runs"]}
    chat_cache, chat_recompute = runs["chat", "cache"], runs["chat", "recompute"]
    # The engine's own counts, turn by turn: resident history is reused exactly, recompute
    # computes everything, and both modes condition on the same prompts.
    assert summarize(chat_cache).fresh_check.ok and summarize(chat_recompute).fresh_check.ok
    assert all(r.cache_hit for r in chat_cache.turns if r.turn > 1)
    assert all(r.miss_reason == "disabled" for r in chat_recompute.turns)
    assert [r.input_tokens for r in chat_cache.turns] == [
        r.input_tokens for r in chat_recompute.turns
    ]
    pressure = runs["pressure", "cache"]
    assert pressure.settings["evictions"] > 0
    assert 0 < summarize(pressure).hit_ratio < 1 and summarize(pressure).recomputed_tokens > 0

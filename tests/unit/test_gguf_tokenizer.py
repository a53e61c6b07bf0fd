"""The tokenizer and chat template of a GGUF file: the same ids and prompt as transformers' from
the same file, for each pre-tokenizer both know; digits one by one for SmolLM's ("smollm")."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from app.chat.chat_format import TemplateChatFormat
from app.chat.chat_template import ChatTemplate
from app.chat.gguf_tokenizer import GGUFTokenizerError, gguf_special_tokens, gguf_tokenizer
from app.engine.loading.gguf.reader import open_gguf
from tests.gguf_files import GGUFTokenizer, write_gguf

transformers = pytest.importorskip("transformers")

MIXED_TEXT = (
    "Hello, World! It's 2024: naïve café, Grüße aus Köln, 你好世界 🙂🚀👩‍👩‍👧 🇫🇷\n\n"
    "def f(x):\n    return x ** 2  # 1234567 89\t\ttabs   and    spaces  \n"
    "<think>reasoning</think> <|im_end|> trailing   "
)
NO_DIGITS = "Hello, World! naïve café 🙂 def f(x):\n    return x  # ok   spaces"


@pytest.fixture(scope="module")
def tokenizer() -> GGUFTokenizer:
    return GGUFTokenizer.train()


@pytest.fixture(scope="module")
def tiny_model():
    config = transformers.LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def write(tmp_path, model, tokenizer, pre: str):
    model.resize_token_embeddings(len(tokenizer.tokens))
    return write_gguf(tmp_path / f"{pre}.gguf", model, "llama", Q.F32, tokenizer, pre=pre)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "tekken"])
def test_ids_equal_transformers_tokenizer_from_the_same_file(pre, tmp_path, tiny_model, tokenizer):
    path = write(tmp_path, tiny_model, tokenizer, pre)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = gguf_tokenizer(open_gguf(path).metadata)

    ids = ours.encode(MIXED_TEXT)
    assert ids == reference.encode(MIXED_TEXT, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == MIXED_TEXT
    assert ours.special_token_ids == {
        tokenizer.tokens.index(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    }
    assert ours.token_to_id("<think>") == tokenizer.tokens.index("<think>")


def test_smollm_splits_digits_one_by_one(tmp_path, tiny_model, tokenizer):
    """As llama.cpp and SmolLM's tokenizer.json; transformers' GGUF reader keeps digit runs."""
    path = write(tmp_path, tiny_model, tokenizer, "smollm")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = gguf_tokenizer(open_gguf(path).metadata)

    assert ours.encode(NO_DIGITS) == reference.encode(NO_DIGITS, add_special_tokens=False)
    digits = [ours.decode([i]) for i in ours.encode("x 12345")]
    assert digits[-5:] == ["1", "2", "3", "4", "5"]


def test_chat_prompt_equals_transformers_apply_chat_template(tmp_path, tiny_model, tokenizer):
    path = write(tmp_path, tiny_model, tokenizer, "qwen2")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    metadata = open_gguf(path).metadata
    ours = gguf_tokenizer(metadata)
    template = ChatTemplate(metadata["tokenizer.chat_template"], {})
    chat = TemplateChatFormat(template, ours, frozenset({tokenizer.eos_id}))

    for system in (None, "Be brief. 🙂"):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": MIXED_TEXT})
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert chat.start(system) + chat.user_turn(MIXED_TEXT) == list(expected)
    assert chat.is_incremental_exact


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "SentencePiece, not supported"),
        ({"tokenizer.ggml.model": "bert"}, "only byte-level BPE"),
        ({"tokenizer.ggml.pre": "jais-2"}, "tokenizer.ggml.pre='jais-2' is not known"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ],
)
def test_tokenizers_that_cannot_be_rebuilt_exactly_are_refused(change, message, tokenizer):
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokenizer.tokens,
        "tokenizer.ggml.merges": tokenizer.merges,
        "tokenizer.ggml.token_type": tokenizer.token_types,
    } | change
    with pytest.raises(GGUFTokenizerError, match=message):
        gguf_tokenizer(metadata)


def test_template_variables_come_from_the_named_token_ids(tmp_path, tiny_model, tokenizer):
    metadata = open_gguf(write(tmp_path, tiny_model, tokenizer, "gpt-2")).metadata
    assert gguf_special_tokens(metadata) == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}

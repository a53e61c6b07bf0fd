"""Fixtures for the tokenizer and chat-format tests: small Hugging Face tokenizer folders.

The tokenizers are byte-level BPEs trained here on a few sentences (no downloads), with the
special tokens of the template they go with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.chat_templates import CHATML_SPECIALS, CHATML_TEMPLATE

TRAINING_TEXT = [
    "Hello! Who are you? I am an assistant, here to help.",
    "Tell me a joke, please. Why did the chicken cross the road? To get to the other side.",
    "You are a helpful assistant. The user greets me. Ha. One more?",
    "Grüße aus Köln — naïve café, 你好世界, こんにちは, 🙂🚀 emoji and\ttabs\n\nnew lines.",
]


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Not prefix-stable: old assistant turns lose their reasoning block (as Qwen3's template does).
REASONING_STRIPPING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Not prefix-stable: keeps only the last three messages.
WINDOWED_TEMPLATE = (
    "{%- for message in messages[-3:] %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 420) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return tokenizer


def write_tokenizer_folder(
    folder: Path,
    special_tokens: list[str],
    template: str | None,
    bos_token: str | None,
    eos_token: str,
    template_in_jinja_file: bool = False,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train_byte_level_bpe(special_tokens).save(str(folder / "tokenizer.json"))
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # The object form transformers 4.x writes; read_chat_template accepts both forms.
        "eos_token": {
            "__type": "AddedToken",
            "content": eos_token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "model_max_length": 4096,
    }
    if bos_token is not None:
        config["bos_token"] = bos_token
    if template is not None and template_in_jinja_file:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "chatml": write_tokenizer_folder(
            root / "chatml", CHATML_SPECIALS, CHATML_TEMPLATE, None, "<|im_end|>"
        ),
        "llama3": write_tokenizer_folder(
            root / "llama3",
            LLAMA3_SPECIALS,
            LLAMA3_TEMPLATE,
            "<|begin_of_text|>",
            "<|eot_id|>",
            template_in_jinja_file=True,
        ),
        "reasoning": write_tokenizer_folder(
            root / "reasoning", CHATML_SPECIALS, REASONING_STRIPPING_TEMPLATE, None, "<|im_end|>"
        ),
        "windowed": write_tokenizer_folder(
            root / "windowed", CHATML_SPECIALS, WINDOWED_TEMPLATE, None, "<|im_end|>"
        ),
        "no_template": write_tokenizer_folder(
            root / "no_template", CHATML_SPECIALS, None, None, "<|im_end|>"
        ),
    }

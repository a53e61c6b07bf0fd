"""The tokenizer a GGUF file describes in its metadata, as an `HFTokenizer` (no torch).

    tokenizer = gguf_tokenizer(metadata)          # metadata: GGUF key -> Python value
    special = gguf_special_tokens(metadata)       # {"bos_token": "<|im_start|>", ...} for templates

A GGUF file has no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`), the merges,
each token's type and the special token ids, and names its pre-tokenizer (`tokenizer.ggml.pre`).
Byte-level BPE (`tokenizer.ggml.model` "gpt2": GPT-2, Llama 3, Qwen2/3, SmolLM, Mistral Nemo) is
rebuilt here as a `tokenizers.Tokenizer`, the way transformers builds it from the same file:

    model          BPE over the vocabulary spelled in GPT-2's byte alphabet, with the file's merges
    added tokens   CONTROL tokens (and the named bos/eos/unk/pad) as special, USER_DEFINED as plain
    pre-tokenizer  the split llama.cpp uses for `tokenizer.ggml.pre` (table below)

Text must split exactly as the model was trained, so an unknown pre-tokenizer name is refused
rather than guessed. One deliberate difference from transformers: "smollm" (and llama.cpp's
other StarCoder-style names) split digits one by one, as llama.cpp and the models' own
tokenizer.json do; transformers falls back to GPT-2's split, which keeps runs of digits together.
SentencePiece vocabularies ("llama": Llama 2, Mistral v0.1) are not supported yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from app.chat.tokenizer import HFTokenizer

__all__ = ["GGUFTokenizerError", "gguf_special_tokens", "gguf_tokenizer"]


class GGUFTokenizerError(ValueError):
    """The file's tokenizer cannot be rebuilt exactly; the message says which part."""


# llama_token_type in llama.cpp
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

_GPT2_STYLE = "gpt2"  # GPT-2's own regex, inside the ByteLevel pre-tokenizer
_DIGITS_THEN_GPT2 = "digits+gpt2"  # each digit alone, then GPT-2's regex (StarCoder, SmolLM)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp)
PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2_STYLE,
    "gpt-2": _GPT2_STYLE,
    "gpt2": _GPT2_STYLE,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp looks a whole word up before merging for these (as Llama 3's tokenizer.json says).
_IGNORE_MERGES = frozenset({_LLAMA3_SPLIT})
_NAMED_SPECIALS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE spells every token with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def gguf_special_tokens(metadata: dict[str, Any]) -> dict[str, str]:
    """The named special tokens (bos/eos/unk/pad) as text, the variables chat templates see."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    named = {}
    for name, key in _NAMED_SPECIALS.items():
        token_id = metadata.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            named[name] = tokens[token_id]
    return named


def gguf_tokenizer(metadata: dict[str, Any]) -> HFTokenizer:
    """The file's byte-level BPE tokenizer. Raises GGUFTokenizerError for anything else."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        hint = " (SentencePiece, not supported yet)" if kind == "llama" else ""
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model {kind!r}{hint}: only byte-level BPE ('gpt2') is supported"
        )
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZERS.get(pre_name)
    if split is None:
        raise GGUFTokenizerError(
            f"pre-tokenizer tokenizer.ggml.pre={pre_name!r} is not known here, so text would not "
            f"split as the model expects (known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    merges = _string_list(metadata, "tokenizer.ggml.merges")
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise GGUFTokenizerError(
            f"{len(tokens)} tokens but {len(token_types)} token types in the metadata"
        )

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {
        token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFTokenizerError(f"merge {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    inner = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=split in _IGNORE_MERGES,
        )
    )
    inner.pre_tokenizer = _pre_tokenizer(split)
    inner.decoder = decoders.ByteLevel()

    named = set(gguf_special_tokens(metadata).values())
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if (token_type == TOKEN_CONTROL or token in named) and set(token) <= spelled
    ]
    inner.add_special_tokens(special)
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type == TOKEN_USER_DEFINED and token in vocab
    ]
    inner.add_tokens(user_defined)
    return HFTokenizer(inner)


def _pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    if split == _GPT2_STYLE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _string_list(metadata: dict[str, Any], key: str) -> Sequence[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GGUFTokenizerError(f"GGUF metadata {key!r} is missing or not a list of strings")
    return value

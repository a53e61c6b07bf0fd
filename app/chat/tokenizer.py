"""Tokenizers: text <-> token ids (streaming detokenization is in detokenizer.py).

Two implementations share one interface: `HFTokenizer` (a `tokenizer.json` from a Hugging Face
folder, via the `tokenizers` library) and `ByteTokenizer` (the built-in models: one token per
UTF-8 byte, then a few special tokens, then padding up to the model's vocabulary).

`encode` never adds special tokens (no BOS): the chat format decides where those go.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    special_token_ids: frozenset[int]
    vocab_size: int  # ids the tokenizer knows (the model's embedding may be larger)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid or partial UTF-8 decodes to U+FFFD."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (e.g. a special token), or None."""
        ...


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`)."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        self._inner = inner
        self.special_token_ids = frozenset(
            token_id
            for token_id, added in inner.get_added_tokens_decoder().items()
            if added.special
        )
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {str(folder)!r} (only fast tokenizers are supported)"
            )
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocabulary (models pad their embedding) decode to nothing.
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; `special_tokens` follow; the rest up to `vocab_size` is padding.

    Text that spells a special token ("<|end|>") encodes as its bytes, never as the special token,
    so a user message cannot forge chat-format tokens.
    """

    NUM_BYTES = 256

    def __init__(self, special_tokens: Sequence[str], vocab_size: int | None = None) -> None:
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special tokens must be distinct, got {list(special_tokens)}")
        num_tokens = self.NUM_BYTES + len(special_tokens)
        self.vocab_size = num_tokens if vocab_size is None else vocab_size
        if self.vocab_size < num_tokens:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {num_tokens} tokens")
        self._special_by_id = {self.NUM_BYTES + i: s for i, s in enumerate(special_tokens)}
        self._id_by_special = {s: i for i, s in self._special_by_id.items()}
        self.special_token_ids = frozenset(self._special_by_id)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        pending = bytearray()
        for token_id in ids:
            if 0 <= token_id < self.NUM_BYTES:
                pending.append(token_id)
                continue
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
            special = self._special_by_id.get(token_id)
            if special is not None and not skip_special_tokens:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                out.append(special)
            # Padding ids (and skipped specials) contribute no text; bytes around them still join.
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self._id_by_special.get(token)

"""What a loader hands the engine and the service: the served model with its tokenizer and chat
format (app/engine/loading/loader.py for folders and built-ins, gguf/loader.py for GGUF files)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.chat.chat_format import ChatFormat
from app.chat.tokenizer import Tokenizer
from app.engine.network.model import CausalLM, ModelConfig


@dataclass(frozen=True)
class LoadedModel:
    """Everything the engine and the service need about the served model."""

    name: str  # the built-in name, or the folder's name
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    chat_format: ChatFormat
    eos_token_ids: frozenset[int]  # config.json + generation_config.json
    stop_token_ids: frozenset[int]  # eos + the chat format's end-of-turn tokens
    max_context_length: int  # the longest token log a thread may reach
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def serving(
        cls,
        name: str,
        model: CausalLM,
        tokenizer: Tokenizer,
        chat_format: ChatFormat,
        eos_token_ids: frozenset[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> LoadedModel:
        """The model as served: it stops at eos and at the chat format's end-of-turn tokens, and a
        thread's log may grow to the model's position limit."""
        return cls(
            name=name,
            model=model,
            config=model.config,
            tokenizer=tokenizer,
            chat_format=chat_format,
            eos_token_ids=eos_token_ids,
            stop_token_ids=eos_token_ids | chat_format.stop_token_ids,
            max_context_length=model.config.max_position_embeddings,
            device=device,
            dtype=dtype,
        )


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

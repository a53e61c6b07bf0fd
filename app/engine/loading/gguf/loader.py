"""Load a GGUF file: the network (dequantized to the serving dtype), tokenizer and chat format.

    loaded = load_gguf(path, device="cpu", dtype=torch.float32, name="smollm2-135m-instruct")

Everything that makes a file unservable is found before any weight is expanded, and raised as
one ModelLoadError: an unknown architecture, an unsupported tensor type, a truncated file, an
unknown pre-tokenizer, a missing chat template, or tensors that do not match the metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.chat.chat_format import TemplateChatFormat
from app.chat.chat_template import ChatTemplate, ChatTemplateError
from app.chat.gguf_tokenizer import GGUFTokenizerError, gguf_special_tokens, gguf_tokenizer
from app.engine.loading.gguf.dequant import check_type, dequantize
from app.engine.loading.gguf.metadata import gguf_model_config
from app.engine.loading.gguf.reader import GGUFFile, open_gguf
from app.engine.loading.gguf.tensor_names import PERMUTED_ARCHITECTURES, engine_name, unpermute_qk
from app.engine.loading.hf_config import ModelLoadError
from app.engine.loading.loaded_model import LoadedModel, resolve_device
from app.engine.loading.weights import empty_network, ready_network, some_names
from app.engine.network.model import CausalLM, ModelConfig


def load_gguf(
    path: str | Path,
    device: torch.device | str = "auto",
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> LoadedModel:
    """A GGUF file as a LoadedModel. `dtype` None: float32 on the CPU, else bfloat16."""
    device = resolve_device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    gguf_file = open_gguf(path)
    source = str(gguf_file.path)
    name = name or gguf_file.path.stem
    config = gguf_model_config(gguf_file)
    for tensor in gguf_file.tensors.values():
        check_type(tensor, source)

    try:
        tokenizer = gguf_tokenizer(gguf_file.metadata)
    except GGUFTokenizerError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
            f"embedding's {config.vocab_size} rows"
        )
    template_source = gguf_file.metadata.get("tokenizer.chat_template")
    if not isinstance(template_source, str) or not template_source:
        raise ModelLoadError(f"{source}: no chat template (tokenizer.chat_template) in the file")
    eos = frozenset(config.extra["eos_token_ids"])
    try:
        template = ChatTemplate(template_source, gguf_special_tokens(gguf_file.metadata))
        chat_format = TemplateChatFormat(template, tokenizer, eos, model_name=name)
    except ChatTemplateError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc

    model = load_gguf_network(gguf_file, config, device, dtype)
    return LoadedModel.serving(name, model, tokenizer, chat_format, eos, device, dtype)


def load_gguf_network(
    gguf_file: GGUFFile, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """The network with every tensor dequantized, un-permuted where needed, on `device`."""
    source = str(gguf_file.path)
    model, expected = empty_network(config)
    permuted = config.extra["gguf_architecture"] in PERMUTED_ARCHITECTURES

    unknown = [n for n in gguf_file.tensors if engine_name(n) not in expected]
    if unknown:
        raise ModelLoadError(
            f"{source}: unexpected tensors for {config.architecture}: {some_names(unknown)}"
        )
    state: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in gguf_file.tensors.items():
        name = engine_name(gguf_name)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected[name]:
            raise ModelLoadError(
                f"{source}: tensor {gguf_name!r} has shape {shape}, the metadata implies "
                f"{expected[name]}"
            )
        weight = dequantize(tensor, source)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_qk(weight, config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_qk(weight, config.num_kv_heads)
        state[name] = weight.to(device=device, dtype=dtype)
    return ready_network(model, state, expected, source, device, dtype)

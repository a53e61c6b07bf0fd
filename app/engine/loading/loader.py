"""Load a model: a Hugging Face folder (safetensors) or a built-in name, with everything around it.

    load_model(folder, device, dtype) -> (CausalLM, ModelConfig)     the network only
    resolve_model(name_or_path, device, dtype) -> LoadedModel        network, tokenizer, chat format

A name of the model registry or a `.gguf` path goes to the GGUF loader (app/engine/loading/gguf).

The network is built on the `meta` device (no memory, no random init) and each checkpoint tensor
is read once, converted to the target dtype on the target device and assigned in place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from app.chat.chat_format import ChatFormat, SimpleChatFormat, TemplateChatFormat
from app.chat.chat_template import ChatTemplateError, read_chat_template
from app.chat.tokenizer import HFTokenizer, Tokenizer
from app.engine.loading import builtin, model_registry
from app.engine.loading.hf_config import ModelLoadError, read_hf_config
from app.engine.loading.loaded_model import LoadedModel, resolve_device
from app.engine.loading.weights import empty_network, ready_network, some_names
from app.engine.network.model import CausalLM, ModelConfig

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_device", "resolve_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors some checkpoints carry that the engine derives instead (old Llama exports saved rope).
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_model(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """A Hugging Face folder's network, ready for inference (eval, no grad, rope tables built).

    `dtype` None keeps the checkpoint's dtype (config.json), float32 when it names none.
    Raises ModelLoadError naming the missing file, or the missing/unexpected/misshapen tensor.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    device = resolve_device(device)
    if dtype is None:
        dtype = _DTYPES[config.extra.get("dtype") or "float32"]

    model, expected = empty_network(config)

    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file, name, shape, read in _checkpoint_tensors(folder, device):
        if name not in expected:
            if name.endswith(_DERIVED_SUFFIXES) or (
                name == "lm_head.weight" and config.tie_word_embeddings
            ):
                continue
            unexpected.append(name)
            continue
        if name in state:
            raise ModelLoadError(f"{folder}: tensor {name!r} appears twice (again in {file})")
        if shape != expected[name]:
            raise ModelLoadError(
                f"{folder}: tensor {name!r} in {file} has shape {shape}, "
                f"the config implies {expected[name]}"
            )
        state[name] = read().to(device=device, dtype=dtype)
    if unexpected:
        raise ModelLoadError(
            f"{folder}: unexpected tensors for {config.architecture}: {some_names(unexpected)}"
        )
    return ready_network(model, state, expected, str(folder), device, dtype), config


def _checkpoint_tensors(
    folder: Path, device: torch.device
) -> Iterator[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(file name, tensor name, shape, reader) for every tensor of the checkpoint, shard by shard.

    A reader is valid only until the next item (the shard's file closes after its last one).
    """
    # safetensors reads straight into GPU memory; everything else goes through the host.
    read_device = str(device) if device.type == "cuda" else "cpu"
    if (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
        listed: dict[str, str] | None = None
    elif (folder / INDEX_FILE).is_file():
        listed = _read_index(folder)
        files = sorted(set(listed.values()))
    else:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = (
            " (PyTorch .bin checkpoints are not supported)"
            if any(name.endswith(".bin") for name in present)
            else ""
        )
        raise ModelLoadError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    for file in files:
        path = folder / file
        if not path.is_file():
            raise ModelLoadError(f"{folder}: {INDEX_FILE} lists {file}, which is missing")
        with safe_open(str(path), framework="pt", device=read_device) as handle:
            names = list(handle.keys())
            if listed is not None:
                absent = [n for n, f in listed.items() if f == file and n not in set(names)]
                if absent:
                    raise ModelLoadError(
                        f"{folder}: {INDEX_FILE} puts {some_names(absent)} in {file}, which lacks them"
                    )
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                yield file, name, shape, lambda handle=handle, name=name: handle.get_tensor(name)


def _read_index(folder: Path) -> dict[str, str]:
    path = folder / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a safetensors index (no weight_map): {exc}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
        for f in weight_map.values()
    ):
        raise ModelLoadError(f"{path}: weight_map must map tensor names to file names")
    return weight_map


def resolve_model(
    name_or_path: str | Path,
    device: torch.device | str = "auto",
    dtype: torch.dtype | None = None,
    data_dir: Path | None = None,
) -> LoadedModel:
    """A built-in model by name, or a Hugging Face folder, with its tokenizer and chat format.
    (A registry name, pulled into `data_dir`/models, or a .gguf file: the GGUF loader.)

    `dtype` None picks float32 on the CPU; on an accelerator the checkpoint's 16-bit dtype, or
    bfloat16 when the checkpoint is float32 (the built-in models included).
    """
    device = resolve_device(device)
    name = str(name_or_path)
    if name.endswith(".gguf") or model_registry.is_registered(name):
        from app.engine.loading.gguf import load_gguf

        registered = model_registry.is_registered(name)
        path = model_registry.pulled_file(name, data_dir) if registered else Path(name)
        if path is None:
            raise ModelLoadError(
                f"model {name!r} is not pulled: run `kvthreads models pull {name}`"
            )
        return load_gguf(path, device, dtype, name=name if registered else Path(name).stem)
    if builtin.is_builtin(name):
        dtype = dtype or _default_dtype(device, None)
        model, config = builtin.build_builtin_model(name, device, dtype)
        tokenizer = builtin.builtin_tokenizer()
        chat_format: ChatFormat = SimpleChatFormat(tokenizer)
        eos = frozenset(config.extra["eos_token_ids"])
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise ModelLoadError(
                f"model {name!r} is neither a built-in model "
                f"({', '.join(builtin.BUILTIN_MODELS)}) nor a folder"
            )
        config = read_hf_config(folder)
        dtype = dtype or _default_dtype(device, config.extra.get("dtype"))
        try:
            tokenizer = HFTokenizer.from_folder(folder)
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from exc
        try:
            template = read_chat_template(folder)
            eos = frozenset(config.extra["eos_token_ids"]) | _generation_config_eos(folder)
            eos |= _token_ids(tokenizer, template.special_tokens.get("eos_token"))
            chat_format = TemplateChatFormat(template, tokenizer, eos, model_name=folder.name)
        except ChatTemplateError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from exc
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelLoadError(
                f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                f"model's vocab_size {config.vocab_size}"
            )
        name = folder.name
        model, config = load_model(folder, device, dtype)
    return LoadedModel.serving(name, model, tokenizer, chat_format, eos, device, dtype)


def _default_dtype(device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in ("float16", "bfloat16"):
        return _DTYPES[checkpoint_dtype]
    return torch.bfloat16


def _generation_config_eos(folder: Path) -> frozenset[int]:
    """Instruct models often list their end-of-turn tokens only in generation_config.json."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return frozenset()
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is not a JSON object: {exc}") from exc
    values = value if isinstance(value, list) else [value]
    return frozenset(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _token_ids(tokenizer: Tokenizer, token: str | None) -> frozenset[int]:
    """The id of a named special token (tokenizer_config.json's eos_token), when the tokenizer has it."""
    token_id = tokenizer.token_to_id(token) if token is not None else None
    return frozenset() if token_id is None else frozenset({token_id})

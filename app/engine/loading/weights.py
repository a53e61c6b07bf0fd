"""The engine's network built from a checkpoint's tensors, for both loaders (folders and GGUF).

model, expected = empty_network(config)             # on the meta device: no memory yet
state = {name: tensor, ...}                         # the loader checks names and shapes
model = ready_network(model, state, expected, source, device, dtype)
"""

from __future__ import annotations

import torch

from app.engine.loading.hf_config import ModelLoadError
from app.engine.network.model import CausalLM, ModelConfig

MAX_NAMES_IN_ERROR = 5


def some_names(names: list[str]) -> str:
    """The first few names of a list for an error message, and how many more there are."""
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    more = len(names) - MAX_NAMES_IN_ERROR
    return f"{shown} and {more} more" if more > 0 else shown


def empty_network(config: ModelConfig) -> tuple[CausalLM, dict[str, tuple[int, ...]]]:
    """The network on the meta device, and the tensors a checkpoint must give it by name and
    shape (a tied lm_head is not one of them: checkpoints may or may not store it, we tie it)."""
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return model, expected


def ready_network(
    model: CausalLM,
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    source: str,
    device: torch.device,
    dtype: torch.dtype,
) -> CausalLM:
    """Put the checked tensors in and make the network ready to serve: embeddings tied, rope
    tables on the device, eval mode, no gradients. Raises ModelLoadError on a missing tensor."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{source}: missing tensors: {some_names(missing)}")
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings, assign=True)
    model.tie_weights()
    model.init_rope(device, dtype)
    model.eval()
    model.requires_grad_(False)
    return model

"""The transformers twin of an engine model: the reference that benchmarks and tests compare
against (not serving code; needs transformers, the dev extra).

    hf = transformers_twin(model)   # LlamaForCausalLM with model's weights
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.engine.loading.hf_config import llama_config_kwargs

if TYPE_CHECKING:
    from app.engine.network.model import CausalLM


def transformers_twin(model: CausalLM):
    """transformers' `LlamaForCausalLM` holding `model`'s weights, without special token ids:
    the reference of the throughput benchmark and of the greedy-generation test. Needs
    transformers (the dev extra)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        **llama_config_kwargs(model.config),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # Only transformers' rotary buffer may be missing: the engine derives its rope tables.
    if unexpected or any("rotary" not in name for name in missing):
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return hf

"""Read a Hugging Face `config.json` into the engine's `ModelConfig`.

Both key styles are accepted:

    transformers 4.x:  "torch_dtype", "rope_theta", "rope_scaling": {"type"|"rope_type", "factor", ...}
    transformers 5.x:  "dtype", "rope_parameters": {"rope_type", "rope_theta", "factor", ...}

What the checkpoint says beyond the model's shape is kept in `ModelConfig.extra`:

    extra["model_type"]        "llama" | "mistral" | "qwen2" | "qwen3"
    extra["dtype"]             the checkpoint's dtype name ("bfloat16", ...) or None
    extra["bos_token_id"]      int | None
    extra["eos_token_ids"]     tuple[int, ...] (config.json allows an int or a list)
    extra["sliding_window"]    int | None, the window of the layers that use one
    extra["declared_max_position_embeddings"]  the config's own value, before the window cap

Sliding windows are served exactly by never letting a sequence outgrow the window: while every
key is inside the window, windowed attention equals full attention. So a window smaller than
`max_position_embeddings` lowers `ModelConfig.max_position_embeddings` (the longest sequence the
engine serves) to the window. Mistral 7B v0.1 (window 4096) is served up to 4096 tokens; later
Mistral and Qwen releases have no active window and keep their full length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine.network.model import ModelConfig


class ModelLoadError(ValueError):
    """A model folder or config the engine cannot serve; the message says which part and why."""


# architecture -> model_type, and the variant switches each one implies
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCHITECTURE_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def read_hf_config(folder: str | Path) -> ModelConfig:
    """`folder/config.json` -> ModelConfig. Raises ModelLoadError naming what is wrong."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {str(folder)!r}: not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return parse_hf_config(raw, source=str(path))


def llama_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing the network of a Llama-shaped
    `config` (no biases, no q/k norm), so the same `state_dict()` loads into
    `LlamaForCausalLM`: the reference that benchmarks and tests compare against. Token ids are
    the caller's to add."""
    if config.attention_bias or config.qk_norm:
        raise ValueError(f"{config.architecture} is not Llama-shaped (attention bias or q/k norm)")
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def parse_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A config.json already parsed into a dict -> ModelConfig."""
    architecture = _architecture(raw, source)
    model_type = SUPPORTED_ARCHITECTURES[architecture]
    _refuse_unsupported_variants(raw, architecture, source)

    hidden_size = _require_int(raw, "hidden_size", source)
    num_heads = _require_int(raw, "num_attention_heads", source)
    num_kv_heads = _optional_int(raw, "num_key_value_heads", source) or num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    head_dim = _optional_int(raw, "head_dim", source)
    if head_dim is None:
        # Qwen3's own default is 128 whatever the hidden size; the others derive it.
        head_dim = 128 if model_type == "qwen3" else hidden_size // num_heads
    declared_max_positions = _require_int(raw, "max_position_embeddings", source)
    sliding_window = _active_sliding_window(raw, model_type, source)
    max_positions = declared_max_positions
    if sliding_window is not None:
        max_positions = min(max_positions, sliding_window)
    rope_theta, rope_scaling = _rope(raw, source)

    return ModelConfig(
        vocab_size=_require_int(raw, "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_require_int(raw, "intermediate_size", source),
        num_layers=_require_int(raw, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (its config has no switch for them).
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        architecture=architecture,
        extra={
            "model_type": model_type,
            "dtype": _dtype_name(raw, source),
            "bos_token_id": next(iter(_token_ids(raw, "bos_token_id", source)), None),
            "eos_token_ids": _token_ids(raw, "eos_token_id", source),
            "sliding_window": sliding_window,
            "declared_max_position_embeddings": declared_max_positions,
        },
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = raw.get("architectures")
    if architectures:
        if not isinstance(architectures, list) or not all(
            isinstance(a, str) for a in architectures
        ):
            raise ModelLoadError(f"{source}: 'architectures' must be a list of names")
        name = architectures[0]
        if name not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: unsupported architecture {name!r} (supported: {supported})"
            )
        return name
    # A config saved on its own (no model) has only model_type.
    model_type = raw.get("model_type")
    if model_type in _ARCHITECTURE_BY_MODEL_TYPE:
        return _ARCHITECTURE_BY_MODEL_TYPE[model_type]
    raise ModelLoadError(
        f"{source}: unsupported architecture (model_type {model_type!r}, no 'architectures'; "
        f"supported: {supported})"
    )


def _refuse_unsupported_variants(raw: dict[str, Any], architecture: str, source: str) -> None:
    """Switches the checkpoint format allows but the one model implementation does not have."""
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelLoadError(f"{source}: hidden_act {hidden_act!r} is not supported (only 'silu')")
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"{source}: mlp_bias=true is not supported")
    # Llama and Qwen3 put attention_bias on o_proj too; only Qwen2's q/k/v-only biases exist here.
    if raw.get("attention_bias") and architecture != "Qwen2ForCausalLM":
        raise ModelLoadError(
            f"{source}: attention_bias=true is not supported for {architecture} "
            "(only Qwen2's q/k/v biases are)"
        )


def _active_sliding_window(raw: dict[str, Any], model_type: str, source: str) -> int | None:
    """The window size when some layer attends through one, else None (full attention)."""
    window = raw.get("sliding_window")
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ModelLoadError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    if model_type == "mistral":
        return window  # every Mistral layer is windowed when the window is set
    if model_type in ("qwen2", "qwen3"):
        layer_types = raw.get("layer_types")
        if layer_types is not None:  # transformers 5.x spells out each layer
            return window if "sliding_attention" in layer_types else None
        if not raw.get("use_sliding_window", False):
            return None
        # 4.x: layers from max_window_layers on use the window.
        num_layers = _require_int(raw, "num_hidden_layers", source)
        max_window_layers = raw.get("max_window_layers", num_layers)
        return window if max_window_layers < num_layers else None
    return None  # Llama has no sliding window


def _rope(raw: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling normalised to {"rope_type": ..., params} or None)."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ModelLoadError(
                f"{source}: rope_parameters must be one dict with rope_theta "
                f"(per-layer-type rope is not supported), got {params!r}"
            )
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ModelLoadError(f"{source}: rope_scaling must be a dict or null, got {scaling!r}")
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta <= 0:
        raise ModelLoadError(f"{source}: rope_theta must be a positive number, got {theta!r}")

    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope scaling type {kind!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor is not supported")
    if kind == "default":
        return float(theta), None
    required = ("factor",) if kind == "linear" else ("factor", "original_max_position_embeddings")
    missing = [key for key in required if key not in scaling]
    if missing:
        raise ModelLoadError(f"{source}: rope scaling {kind!r} lacks {', '.join(missing)}")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    normalised = {"rope_type": kind} | {k: scaling[k] for k in keep if k in scaling}
    return float(theta), normalised


def _dtype_name(raw: dict[str, Any], source: str) -> str | None:
    name = raw.get("dtype", raw.get("torch_dtype"))
    if name is None:
        return None
    if name not in _DTYPE_NAMES:
        raise ModelLoadError(
            f"{source}: checkpoint dtype {name!r} is not supported (supported: {', '.join(_DTYPE_NAMES)})"
        )
    return name


def _token_ids(raw: dict[str, Any], key: str, source: str) -> tuple[int, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelLoadError(f"{source}: {key} must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _require_int(raw: dict[str, Any], key: str, source: str) -> int:
    value = _optional_int(raw, key, source)
    if value is None:
        raise ModelLoadError(f"{source}: missing {key!r}")
    return value


def _optional_int(raw: dict[str, Any], key: str, source: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value

"""GGUF metadata -> the engine's ModelConfig.

llama.cpp keys are prefixed by the architecture (`llama.block_count`, `qwen2.context_length`):

    {arch}.embedding_length            hidden_size
    {arch}.feed_forward_length         intermediate_size
    {arch}.block_count                 num_layers
    {arch}.attention.head_count(_kv)   num_heads, num_kv_heads (default: num_heads)
    {arch}.attention.key_length        head_dim (default: hidden_size // num_heads)
    {arch}.rope.dimension_count        must equal head_dim (partial rotary is not served)
    {arch}.rope.freq_base              rope_theta (default 10000)
    {arch}.rope.scaling.type/.factor   "linear" only
    {arch}.context_length              max_position_embeddings
    {arch}.attention.layer_norm_rms_epsilon

Mistral files are written with architecture "llama" (llama.cpp has no Mistral of its own) and
are served as Llama: the same network without a sliding window, as llama.cpp runs them.
Embeddings are tied when the file has no `output.weight`.
"""

from __future__ import annotations

from app.engine.loading.gguf.reader import GGUFFile
from app.engine.loading.hf_config import ModelLoadError
from app.engine.network.model import ModelConfig

# general.architecture -> (engine architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def gguf_architecture(gguf_file: GGUFFile) -> str:
    arch = gguf_file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_file.path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    return arch


def gguf_model_config(gguf_file: GGUFFile) -> ModelConfig:
    """The network's shape and variants from the metadata. Raises ModelLoadError."""
    arch = gguf_architecture(gguf_file)
    architecture, model_type = ARCHITECTURES[arch]
    source = str(gguf_file.path)

    def number(key: str, default: int | float | None = None, kind: type = int):
        value = gguf_file.metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ModelLoadError(f"{source}: {arch}.{key} must be a positive number, got {value!r}")
        return kind(value)

    hidden_size = number("embedding_length")
    num_heads = number("attention.head_count")
    num_kv_heads = number("attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{source}: head_count ({num_heads}) is not a multiple of head_count_kv ({num_kv_heads})"
        )
    head_dim = number("attention.key_length", hidden_size // num_heads)
    if number("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{source}: value_length differs from key_length (not supported)")
    rotary_dim = number("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ModelLoadError(
            f"{source}: rope.dimension_count {rotary_dim} != head dimension {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    if "rope_freqs.weight" in gguf_file.tensors:
        raise ModelLoadError(
            f"{source}: per-dimension rope frequency factors (tensor rope_freqs.weight, "
            "Llama 3.1-style rope scaling) are not supported"
        )
    rope_scaling = None
    scaling_type = gguf_file.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor", kind=float)}
    elif scaling_type != "none":
        raise ModelLoadError(
            f"{source}: rope scaling {scaling_type!r} is not supported (supported: none, linear)"
        )
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelLoadError(f"{source}: no token_embd.weight tensor")
    vocab_size = int(embedding.shape[-1])  # ne = [hidden, vocab]
    max_positions = number("context_length")
    bos = gguf_file.metadata.get("tokenizer.ggml.bos_token_id")
    eos_ids = tuple(
        gguf_file.metadata[key]
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if isinstance(gguf_file.metadata.get(key), int)
    )
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=number("feed_forward_length"),
        num_layers=number("block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=number("rope.freq_base", 10000.0, kind=float),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in gguf_file.tensors,
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        architecture=architecture,
        extra={
            "model_type": model_type,
            "dtype": None,
            "bos_token_id": bos if isinstance(bos, int) else None,
            "eos_token_ids": tuple(dict.fromkeys(eos_ids)),
            "sliding_window": None,
            "declared_max_position_embeddings": max_positions,
            "gguf_architecture": arch,
        },
    )

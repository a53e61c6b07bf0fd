"""Write small GGUF files for the tests, the way llama.cpp's converter lays them out.

    tokenizer = GGUFTokenizer.train()                    # a byte-level BPE trained here
    write_gguf(path, hf_model, "llama", GGMLQuantizationType.Q4_0, tokenizer, pre="gpt-2")

Norms and biases stay F32 (as llama.cpp keeps them); 2-D weights take the requested type. q and k
rows are permuted for "llama" files as the converter permutes them. gguf can quantize the legacy
types; for the K types (which it can only read) the blocks are random bytes with small scales, so
the file's weights are what those blocks say, and the reference is transformers reading the same
file, never the model the file was written from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.chat_templates import CHATML_SPECIALS, CHATML_TEMPLATE

TRAINING_TEXT = [
    "Hello! Who are you? I am an assistant, here to help. What is the capital of France?",
    "Tell me a joke, please. Why did the chicken cross the road? To get to the other side.",
    "You are a helpful assistant. The user greets me. Ha. One more? It's 2024, isn't it?",
    "Grüße aus Köln — naïve café, 你好世界, こんにちは, 🙂🚀 emoji and\ttabs\n\nnew lines.",
    "def f(x):\n    return x ** 2  # 12345 67 890\nprint(f(3))\n",
]
USER_DEFINED = "<think>"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


@dataclass(frozen=True)
class GGUFTokenizer:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    bos_id: int
    eos_id: int

    @classmethod
    def train(cls, vocab_size: int = 400) -> GGUFTokenizer:
        """ChatML specials (control), one user-defined token, bytes and learned merges."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[*CHATML_SPECIALS, USER_DEFINED],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
        model = json.loads(tokenizer.to_str())["model"]
        by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
        tokens = [token for token, _ in by_id]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        types = [
            TOKEN_CONTROL
            if t in CHATML_SPECIALS
            else TOKEN_USER_DEFINED
            if t == USER_DEFINED
            else TOKEN_NORMAL
            for t in tokens
        ]
        return cls(tokens, merges, types, tokens.index("<|im_start|>"), tokens.index("<|im_end|>"))


_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permute(): halves -> interleaved pairs within each head."""
    shape = weights.shape
    return (
        weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def random_k_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks [rows, bytes] whose scales keep the weights within about +-0.2."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ql[128] qh[64] scales int8[16] d f16
        blocks[:, 192:208] = (
            rng.integers(-8, 9, size=(blocks.shape[0], 16)).astype(np.int8).view(np.uint8)
        )
        blocks[:, 208:210] = np.full((blocks.shape[0], 1), 0.0008, np.float16).view(np.uint8)
    else:  # Q4_K, Q5_K: d f16, dmin f16, 12 bytes of 6-bit scales and mins, then the quants
        scale = 0.0002 if qtype == Q.Q4_K else 0.0001
        blocks[:, 0:4] = np.full((blocks.shape[0], 2), scale, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(
    path: Path,
    hf_model,
    arch: str,
    qtype: Q,
    tokenizer: GGUFTokenizer,
    *,
    pre: str = "gpt-2",
    name: str = "tiny",
    template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
) -> Path:
    """`hf_model` (a transformers Llama/Mistral/Qwen2/Qwen3) as a GGUF file of architecture `arch`."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(qtype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_merges(tokenizer.merges)
    writer.add_token_types(tokenizer.token_types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    if template is not None:
        writer.add_chat_template(template)

    state = hf_model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for index, (hf_name, tensor) in enumerate(state.items()):
        if "rotary_emb" in hf_name:
            continue
        weights = tensor.detach().float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            weights = permute_qk(weights, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            weights = permute_qk(weights, config.num_key_value_heads)
        out_name = gguf_name(hf_name)
        if weights.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(out_name, np.ascontiguousarray(weights, dtype=np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(out_name, weights.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            blocks = random_k_blocks(qtype, *weights.shape, seed=seed * 1000 + index)
            writer.add_tensor(out_name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            data = quantize(weights, qtype)
            writer.add_tensor(out_name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def with_one_tensor_as(path: Path, out: Path, tensor_name: str, qtype: Q) -> Path:
    """A copy of the GGUF file at `path` whose tensor `tensor_name` is stored (as zeros) in
    `qtype`: a type the `gguf` package reads but the engine may not accept."""
    writer = GGUFWriter(str(out), "llama")
    reader = GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(
            key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None
        )
    for tensor in reader.tensors:
        if tensor.name == tensor_name:
            _, size = GGML_QUANT_SIZES[qtype]  # one block per row
            data = np.zeros((int(tensor.shape[1]), size), np.uint8)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def tiny_llama(tokenizer: GGUFTokenizer):
    """A one-layer random Llama (transformers) over `tokenizer`'s vocabulary, to write as GGUF."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer.tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()

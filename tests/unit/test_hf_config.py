"""config.json -> ModelConfig, in the key styles of transformers 5.x (as 5.24 writes them) and 4.x."""

from __future__ import annotations

import json

import pytest

from app.engine.loading.hf_config import ModelLoadError, parse_hf_config, read_hf_config
from app.engine.network.model import rope_inv_freq

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def saved_by_transformers(tmp_path, config) -> dict:
    """The config.json transformers writes for `config` (the 5.x key style)."""
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def llama_4x(**overrides) -> dict:
    """A Llama config.json in the transformers 4.x key style, written by hand."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **SMALL,
    }
    raw.update(overrides)
    return raw


def test_transformers_5_llama3_rope_scaling(tmp_path):
    transformers = pytest.importorskip("transformers")
    raw = saved_by_transformers(
        tmp_path,
        transformers.LlamaConfig(
            **SMALL,
            rope_theta=500000.0,
            rope_scaling=dict(LLAMA3_ROPE),  # transformers adds keys to the dict it gets
            max_position_embeddings=512,
        ),
    )
    assert "rope_parameters" in raw and "rope_theta" not in raw  # what 5.x writes
    config = read_hf_config(tmp_path)
    assert config.architecture == "LlamaForCausalLM"
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_ROPE
    assert config.head_dim == 16 and config.num_kv_heads == 2 and config.num_layers == 2
    assert config.max_position_embeddings == 512
    assert not config.attention_bias and not config.qk_norm and not config.tie_word_embeddings
    assert config.extra["bos_token_id"] == 1 and config.extra["eos_token_ids"] == (2,)


def test_transformers_5_qwen2_qwen3_mistral(tmp_path):
    transformers = pytest.importorskip("transformers")
    qwen2 = parse_hf_config(
        saved_by_transformers(tmp_path / "q2", transformers.Qwen2Config(**SMALL))
    )
    assert qwen2.architecture == "Qwen2ForCausalLM"
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen2.max_position_embeddings == 32768  # its sliding window is off
    assert qwen2.extra["sliding_window"] is None and qwen2.extra["eos_token_ids"] == ()

    qwen3 = parse_hf_config(
        saved_by_transformers(tmp_path / "q3", transformers.Qwen3Config(**SMALL, head_dim=32))
    )
    assert qwen3.qk_norm and not qwen3.attention_bias
    assert qwen3.head_dim == 32  # explicit, not hidden / heads

    mistral = parse_hf_config(
        saved_by_transformers(tmp_path / "m", transformers.MistralConfig(**SMALL))
    )
    assert mistral.architecture == "MistralForCausalLM"
    # Its default window (4096) is below max_position_embeddings (131072): served up to the window.
    assert mistral.max_position_embeddings == 4096
    assert mistral.extra["sliding_window"] == 4096
    assert mistral.extra["declared_max_position_embeddings"] == 131072


def test_transformers_4_key_style():
    config = parse_hf_config(
        llama_4x(
            rope_scaling={
                "type": "llama3",
                **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
            }
        )
    )
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_ROPE  # "type" normalised to "rope_type"
    assert config.rms_norm_eps == 1e-5
    assert config.extra["dtype"] == "bfloat16"

    linear = parse_hf_config(llama_4x(rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert rope_inv_freq(linear)[0] == pytest.approx(0.5)

    plain = parse_hf_config(llama_4x(rope_theta=10000.0))
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0


def test_defaults_and_token_ids():
    raw = llama_4x(eos_token_id=[128001, 128008, 128009], tie_word_embeddings=True)
    del raw["num_key_value_heads"], raw["bos_token_id"]
    config = parse_hf_config(raw)
    assert config.num_kv_heads == config.num_heads == 4
    assert config.head_dim == 16
    assert config.tie_word_embeddings
    assert config.extra["eos_token_ids"] == (128001, 128008, 128009)
    assert config.extra["bos_token_id"] is None
    qwen3 = {k: v for k, v in llama_4x(architectures=["Qwen3ForCausalLM"]).items()}
    assert parse_hf_config(qwen3).head_dim == 128  # Qwen3's own default, as transformers has it


def test_qwen2_4x_sliding_window_only_when_used():
    off = llama_4x(
        architectures=["Qwen2ForCausalLM"],
        max_position_embeddings=32768,
        sliding_window=4096,
        use_sliding_window=False,
        max_window_layers=1,
    )
    assert parse_hf_config(off).max_position_embeddings == 32768
    on = dict(off, use_sliding_window=True)
    assert parse_hf_config(on).max_position_embeddings == 4096
    on_no_layer = dict(on, max_window_layers=2)  # no layer index >= 2 of 2 layers
    assert parse_hf_config(on_no_layer).max_position_embeddings == 32768


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            "unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM",
        ),
        ({"architectures": None, "model_type": "gemma"}, "unsupported architecture.*'gemma'"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4.0}},
            "rope scaling type 'yarn' is not supported",
        ),
        (
            {"rope_scaling": {"type": "llama3", "factor": 8.0}},
            "lacks original_max_position_embeddings",
        ),
        ({"attention_bias": True}, "attention_bias=true is not supported for LlamaForCausalLM"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_size": None}, "missing 'hidden_size'"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be"),
        ({"torch_dtype": "int8"}, "dtype 'int8'"),
        ({"vocab_size": -3}, "vocab_size must be a positive integer"),
    ],
)
def test_clear_errors(overrides, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_hf_config(llama_4x(**overrides))


def test_missing_or_broken_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_hf_config(tmp_path)

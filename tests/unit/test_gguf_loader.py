"""What cannot be served from a GGUF file fails at load with one ModelLoadError naming why; the
registry names and .gguf paths reach the GGUF loader through KVTHREADS_MODEL and resolve_model."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from app.config import ConfigError, load_settings
from app.engine.loading import model_registry
from app.engine.loading.gguf import load_gguf
from app.engine.loading.gguf.tensor_names import engine_name, unpermute_qk
from app.engine.loading.hf_config import ModelLoadError
from app.engine.loading.loader import resolve_model
from tests.gguf_files import (
    GGUFTokenizer,
    permute_qk,
    tiny_llama,
    with_one_tensor_as,
    write_gguf,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer() -> GGUFTokenizer:
    return GGUFTokenizer.train()


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    return tiny_llama(tokenizer)


def test_a_good_file_loads_with_its_chat_format(tmp_path, hf_model, tokenizer):
    loaded = load_gguf(write_gguf(tmp_path / "m.gguf", hf_model, "llama", Q.Q8_0, tokenizer), "cpu")
    assert loaded.name == "m"
    assert loaded.dtype == torch.float32
    assert loaded.config.num_layers == 1 and loaded.config.vocab_size == len(tokenizer.tokens)
    assert tokenizer.eos_id in loaded.stop_token_ids
    header = loaded.tokenizer.encode("<|im_start|>assistant\n")
    assert loaded.chat_format.user_turn("hi")[-len(header) :] == header


def test_unsupported_tensor_type_is_refused_by_name(tmp_path, hf_model, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", hf_model, "llama", Q.F32, tokenizer)
    # One tensor as Q2_K (which gguf can read, but the engine does not accept).
    writer_path = with_one_tensor_as(path, tmp_path / "q2k.gguf", "blk.0.ffn_up.weight", Q.Q2_K)
    with pytest.raises(
        ModelLoadError, match="'blk.0.ffn_up.weight' has type Q2_K, which is not supported"
    ):
        load_gguf(writer_path, "cpu")


def test_unknown_architecture_is_refused(tmp_path, hf_model, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", hf_model, "falcon", Q.F32, tokenizer)
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'falcon'"):
        load_gguf(path, "cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file_is_refused(tmp_path, hf_model, tokenizer, keep):
    path = write_gguf(tmp_path / "m.gguf", hf_model, "llama", Q.Q4_0, tokenizer)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(path, "cpu")


def test_a_file_without_chat_template_is_refused(tmp_path, hf_model, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", hf_model, "llama", Q.F16, tokenizer, template=None)
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_gguf(path, "cpu")


def test_an_unknown_pre_tokenizer_is_refused_at_load(tmp_path, hf_model, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", hf_model, "llama", Q.F16, tokenizer, pre="chatglm-bpe")
    with pytest.raises(ModelLoadError, match="'chatglm-bpe' is not known"):
        load_gguf(path, "cpu")


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_gguf(path, "cpu")


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permutation(num_heads):
    weight = torch.randn(num_heads * 8, 5)
    permuted = torch.from_numpy(permute_qk(weight.numpy(), num_heads))
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, num_heads), weight)
    bias = torch.randn(num_heads * 8)
    assert torch.equal(
        unpermute_qk(torch.from_numpy(permute_qk(bias.numpy(), num_heads)), num_heads), bias
    )


def test_tensor_names():
    assert engine_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert engine_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert engine_name("output.weight") == "lm_head.weight"
    assert engine_name("blk.0.attn_qkv.weight") is None
    assert engine_name("rope_freqs.weight") is None


def test_kvthreads_model_takes_a_gguf_file_and_a_registry_name(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    assert load_settings({"KVTHREADS_MODEL": str(path)}).model == str(path.resolve())
    name = model_registry.DEFAULT_MODEL_NAME
    assert load_settings({"KVTHREADS_MODEL": name}).model == name
    with pytest.raises(ConfigError, match="a .gguf file"):
        load_settings({"KVTHREADS_MODEL": str(tmp_path / "absent.gguf")})


def test_a_registry_name_not_pulled_says_how_to_pull(tmp_path):
    name = model_registry.DEFAULT_MODEL_NAME
    with pytest.raises(ModelLoadError, match=f"kvthreads models pull {name}"):
        resolve_model(name, "cpu", data_dir=tmp_path)


def test_a_registry_name_resolves_to_its_pulled_file(tmp_path, hf_model, tokenizer, monkeypatch):
    name = model_registry.DEFAULT_MODEL_NAME
    entry = model_registry.REGISTRY[name]
    models = model_registry.models_dir(tmp_path)
    models.mkdir(parents=True)
    path = write_gguf(models / entry.file_name, hf_model, "llama", Q.F32, tokenizer)
    monkeypatch.setitem(
        model_registry.REGISTRY,
        name,
        model_registry.RegistryModel(name, "", "", entry.member, "0" * 64, path.stat().st_size),
    )
    loaded = resolve_model(name, "cpu", data_dir=tmp_path)
    assert loaded.name == name
    assert loaded.config.hidden_size == 64

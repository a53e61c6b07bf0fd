"""load_model / resolve_model: what they load, and clear errors for what they cannot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.chat.chat_format import TemplateChatFormat
from app.engine.loading.hf_config import parse_hf_config
from app.engine.loading.loader import ModelLoadError, load_model, resolve_model
from app.engine.network.model import CausalLM

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "eos_token_id": 2,
}


def state_dict(config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = CausalLM(parse_hf_config(config))
    # Tied parameters would share storage, which save_file refuses: clone each one.
    return {name: t.clone() for name, t in model.state_dict().items()}


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_shards(
    folder: Path, config: dict, shards: dict[str, dict[str, torch.Tensor]], index=None
):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(folder / file))
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {}, "weight_map": weight_map if index is None else index}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_loads_exact_weights(tmp_path):
    tensors = state_dict(CONFIG)
    model, config = load_model(write_checkpoint(tmp_path, CONFIG, tensors), "cpu", torch.float32)
    assert config.num_layers == 2
    loaded = model.state_dict()
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_sharded_tied_and_derived_tensors(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    tensors = state_dict(config)
    # Old Llama exports carry rope inverse frequencies; the engine derives them and skips these.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    names = sorted(tensors)
    half = len(names) // 2
    folder = write_shards(
        tmp_path,
        config,
        {
            "model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:half]},
            "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[half:]},
        },
    )
    model, _ = load_model(folder, "cpu", torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_tied_checkpoint_without_lm_head(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    tensors = state_dict(config)
    del tensors["lm_head.weight"]
    model, _ = load_model(write_checkpoint(tmp_path, config, tensors), "cpu", torch.float32)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, "cpu")


def test_missing_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(
        ModelLoadError, match="no model.safetensors or model.safetensors.index.json"
    ):
        load_model(tmp_path, "cpu")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"\.bin checkpoints are not supported"):
        load_model(tmp_path, "cpu")


def test_missing_tensor(tmp_path):
    tensors = state_dict(CONFIG)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_model(write_checkpoint(tmp_path, CONFIG, tensors), "cpu")


def test_untied_checkpoint_without_lm_head(tmp_path):
    tensors = state_dict(CONFIG)
    del tensors["lm_head.weight"]
    with pytest.raises(ModelLoadError, match="missing tensors: lm_head.weight"):
        load_model(write_checkpoint(tmp_path, CONFIG, tensors), "cpu")


def test_unexpected_tensor(tmp_path):
    tensors = state_dict(CONFIG)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensors for LlamaForCausalLM: .*o_proj\.bias"
    ):
        load_model(write_checkpoint(tmp_path, CONFIG, tensors), "cpu")


def test_shape_mismatch(tmp_path):
    tensors = state_dict(dict(CONFIG, vocab_size=500))
    with pytest.raises(
        ModelLoadError,
        match=r"tensor '(lm_head|model\.embed_tokens)\.weight' .* has shape \(500, 32\), "
        r"the config implies \(512, 32\)",
    ):
        load_model(write_checkpoint(tmp_path, CONFIG, tensors), "cpu")


def test_broken_shard_index(tmp_path):
    tensors = state_dict(CONFIG)
    index = dict.fromkeys(tensors, "model-00001-of-00002.safetensors")
    index["lm_head.weight"] = "model-00002-of-00002.safetensors"
    folder = write_shards(
        tmp_path / "a", CONFIG, {"model-00001-of-00002.safetensors": tensors}, index
    )
    with pytest.raises(
        ModelLoadError, match="lists model-00002-of-00002.safetensors, which is missing"
    ):
        load_model(folder, "cpu")

    shard = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    index = dict.fromkeys(tensors, "model.safetensors-1")
    folder = write_shards(tmp_path / "b", CONFIG, {"model.safetensors-1": shard}, index)
    with pytest.raises(
        ModelLoadError, match="puts lm_head.weight in model.safetensors-1, which lacks them"
    ):
        load_model(folder, "cpu")

    twice = {
        "s1.safetensors": tensors,
        "s2.safetensors": {"lm_head.weight": tensors["lm_head.weight"]},
    }
    folder = write_shards(tmp_path / "c", CONFIG, twice)
    with pytest.raises(ModelLoadError, match="'lm_head.weight' appears twice"):
        load_model(folder, "cpu")


def test_unsupported_architecture_through_the_loader(tmp_path):
    config = dict(CONFIG, architectures=["FalconForCausalLM"])
    with pytest.raises(ModelLoadError, match="unsupported architecture 'FalconForCausalLM'"):
        load_model(write_checkpoint(tmp_path, config, {}), "cpu")


def test_resolve_unknown_name():
    with pytest.raises(ModelLoadError, match="neither a built-in model .*builtin-tiny-random"):
        resolve_model("no-such-model-anywhere", "cpu")


def hf_folder(tmp_path: Path, tokenizer_folder: Path, config: dict) -> Path:
    folder = write_checkpoint(tmp_path / "model", config, state_dict(config))
    for file in tokenizer_folder.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def test_resolve_hf_folder(tmp_path, tokenizer_folders):
    config = dict(CONFIG, eos_token_id=[1, 2])
    folder = hf_folder(tmp_path, tokenizer_folders["llama3"], config)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    loaded = resolve_model(folder, "cpu")
    eot = loaded.tokenizer.token_to_id("<|eot_id|>")
    assert loaded.name == "model"
    assert isinstance(loaded.chat_format, TemplateChatFormat)
    assert loaded.chat_format.is_incremental_exact
    assert loaded.eos_token_ids == {1, 2, 3, eot}  # config, generation config, tokenizer config
    assert loaded.stop_token_ids == {1, 2, 3, eot}
    assert loaded.max_context_length == 128
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.model.model.embed_tokens.weight.shape == (512, 32)


def test_resolve_hf_folder_errors(tmp_path, tokenizer_folders):
    bare = write_checkpoint(tmp_path / "bare", CONFIG, state_dict(CONFIG))
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        resolve_model(bare, "cpu")
    no_template = hf_folder(tmp_path / "nt", tokenizer_folders["no_template"], CONFIG)
    with pytest.raises(ModelLoadError, match="no chat template"):
        resolve_model(no_template, "cpu")
    small_vocab = dict(CONFIG, vocab_size=300)
    too_small = hf_folder(tmp_path / "small", tokenizer_folders["chatml"], small_vocab)
    with pytest.raises(ModelLoadError, match="more than the model's vocab_size 300"):
        resolve_model(too_small, "cpu")

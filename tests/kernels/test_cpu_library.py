"""The CPU library's build (kernels/cpu_library.py): cached under a name that hashes what it is
built from, written without leaving scratch behind, and refused without a compiler, in which case
its users fall back to torch (the decode kernel is None, linears pack for oneDNN). Switched off
(KVTHREADS_CPU_KERNELS=off), an engine takes those same paths and gives the same logits."""

from __future__ import annotations

import logging

import torch
from torch import nn

from app.engine.network.packed_linear import LinearGroup
from kernels import cpu_library
from kernels.cpu_decode_attention import load_decode_attention


def test_the_build_is_cached_and_refused_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = cpu_library.built_library()
    folder = tmp_path / "kvthreads" / "kernels"
    assert built.parent == folder and built.exists()
    stamp = built.stat().st_mtime_ns
    assert cpu_library.built_library() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in folder.iterdir()] == [built.name]  # no scratch left behind

    built.unlink()
    monkeypatch.setenv("CXX", "/bin/false")
    cpu_library._loaded_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_library.__name__):
            assert cpu_library.load_cpu_library() is None
            assert load_decode_attention() is None
            group = LinearGroup(nn.Linear(8, 16))
            group.pack()
            assert group.native is None
            if torch.backends.mkldnn.is_available():  # oneDNN's packing instead
                assert group.is_packed
        assert "CPU kernels unavailable" in caplog.text
    finally:
        cpu_library._loaded_library.cache_clear()
    assert not built.exists()


def test_switched_off_an_engine_runs_without_the_library_and_gives_the_same_logits():
    from app.engine.runtime.llm_engine import LLMEngine
    from tests.engine.engine_testing import play_changing_batches, random_model

    def engine():
        model = random_model()  # each engine its own model: packing is the model's
        return LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3)

    native = engine()
    assert native.runner.fused is not None and native.runner.attn.decode_kernel is not None
    expected = play_changing_batches(native)
    cpu_library.set_enabled(False)
    try:
        assert cpu_library.load_cpu_library() is None and load_decode_attention() is None
        plain = engine()
        assert plain.runner.fused is None and plain.runner.attn.native is None
        groups = plain.runner.model.linear_groups()
        assert all(group.native is None for group in groups)  # oneDNN's packing, or fused
        got = play_changing_batches(plain)
    finally:
        cpu_library.set_enabled(True)
    assert cpu_library.load_cpu_library() is not None
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)

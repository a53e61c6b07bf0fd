"""The CPU library's build (kernels/cpu_library.py): cached under a name that hashes what it is
built from, written without leaving scratch behind, and refused without a compiler, in which case
its users fall back to torch (the decode kernel is None, linears pack for oneDNN)."""

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
    cpu_library.load_cpu_library.cache_clear()
    load_decode_attention.cache_clear()
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
        cpu_library.load_cpu_library.cache_clear()
        load_decode_attention.cache_clear()
    assert not built.exists()

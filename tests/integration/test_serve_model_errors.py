"""`kvthreads serve` on a GGUF file it cannot serve stops at start with one line, exit code 2:
another quantization type, an unknown architecture, a truncated file (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from tests.gguf_files import GGUFTokenizer, tiny_llama, with_one_tensor_as, write_gguf
from tests.integration._processes import clean_env, run_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = GGUFTokenizer.train()
    return tiny_llama(tokenizer), tokenizer


def _unsupported_type(model, tokenizer, out: Path) -> Path:
    good = write_gguf(out.with_name("good.gguf"), model, "llama", Q.F32, tokenizer)
    return with_one_tensor_as(good, out, "blk.0.ffn_up.weight", Q.Q2_K)


def _unknown_architecture(model, tokenizer, out: Path) -> Path:
    return write_gguf(out, model, "falcon", Q.F32, tokenizer)


def _truncated(model, tokenizer, out: Path) -> Path:
    good = write_gguf(out.with_name("good.gguf"), model, "llama", Q.Q4_0, tokenizer)
    out.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return out


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_unsupported_type, "has type Q2_K, which is not supported"),
        (_unknown_architecture, "unsupported GGUF architecture"),
        (_truncated, "truncated"),
    ],
)
def test_an_unservable_gguf_stops_serve_with_one_line(
    db_url: str, model_and_tokenizer, tmp_path: Path, make, words: str
) -> None:
    bad = make(*model_and_tokenizer, tmp_path / "bad.gguf")
    env = clean_env(DATABASE_URL=db_url, KVTHREADS_MODEL=str(bad), KVTHREADS_DEVICE="cpu")
    result = run_cli("app", "serve", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"kvthreads: cannot serve {bad}: ") and words in lines[0]

"""Open a GGUF file and read its metadata, every failure as one ModelLoadError.

    gguf_file = open_gguf(path)          # GGUFFile: metadata (plain Python values), tensors
    gguf_file.metadata["llama.block_count"] -> 30
    gguf_file.tensors["blk.0.attn_q.weight"] -> gguf.ReaderTensor (type, shape, raw data view)

The file is memory-mapped (gguf.GGUFReader): opening it reads the header and metadata only. A
file cut short is found here, before any tensor is used: every tensor's bytes must lie inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine.loading.hf_config import ModelLoadError


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # key -> int | float | bool | str | list
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor, in file order

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {key!r}")
        return self.metadata[key]


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor table. Raises ModelLoadError saying what is wrong."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {str(path)!r}")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - the reader raises anything on a bad file
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "is it truncated or not a GGUF file?"
        ) from exc
    size = path.stat().st_size
    tensors: dict[str, Any] = {}
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ModelLoadError(
                f"{path}: truncated GGUF file: tensor {tensor.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )
        if tensor.name in tensors:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} appears twice")
        tensors[tensor.name] = tensor
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts
        try:
            metadata[key] = field.contents()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path}: unreadable GGUF metadata {key!r}: {exc}") from exc
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)

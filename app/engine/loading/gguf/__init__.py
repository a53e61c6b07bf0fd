"""GGUF files (llama.cpp's format) as a model source: `load_gguf(path, device, dtype, name)`.

reader.py        open the file, metadata as Python values, truncation checks
metadata.py      metadata -> ModelConfig
dequant.py       tensor types -> float32 (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K)
tensor_names.py  GGUF names -> parameter names; undo llama.cpp's q/k row permutation
loader.py        all of it -> LoadedModel (tokenizer: app/chat/gguf_tokenizer.py)
"""

from app.engine.loading.gguf.loader import load_gguf

__all__ = ["load_gguf"]

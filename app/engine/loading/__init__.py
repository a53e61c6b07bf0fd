"""Loading: Hugging Face folders, GGUF files, built-in models, and the registry of pullable ones."""

"""Models from Hugging Face folders and built-in specs, with their tokenizer and chat format."""

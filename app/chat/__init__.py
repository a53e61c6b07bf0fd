"""Text <-> tokens without torch: tokenizers, incremental detokenizer, chat formats, templates."""

"""Text <-> tokens without torch: tokenizers, detokenizer, chat formats and templates."""

"""The engine: runtime (step, scheduler, sequences, the async bridge), network (model, attention
backends, KV pool, runner) and loading (Hugging Face folders, built-in models)."""

"""The engine step and what drives it: LLMEngine, scheduler, sequences, sampler, AsyncLLMEngine."""

"""Developer tools: references and helpers for tests and benchmarks, not serving code."""

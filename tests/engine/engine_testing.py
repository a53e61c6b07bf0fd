"""Small random models and engine drivers shared by the engine tests."""

from __future__ import annotations

import torch

from app.engine.network.model import CausalLM, ModelConfig
from app.engine.runtime.llm_engine import LLMEngine, RequestOutput
from app.engine.runtime.types import FinishEvent, SamplingParams


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig | None = None, seed: int = 0) -> CausalLM:
    """A CausalLM with seeded random weights scaled to keep activations and logits O(1), so
    greedy choices are decided by clear margins, not by rounding."""
    config = config or tiny_config()
    model = CausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.tie_weights()
    model.init_rope("cpu", torch.float32)
    return model.eval()


def random_ids(n: int, seed: int, vocab_size: int = 101) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()


class LogitsLog:
    """An on_logits hook: every sampled row's logits, per sequence id, in step order."""

    def __init__(self) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}

    def __call__(self, seqs, logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            self.rows.setdefault(seq.seq_id, []).append(row.clone())


def run_to_finish(
    engine: LLMEngine, *, commit: bool = False, max_steps: int = 10_000
) -> dict[int, FinishEvent]:
    """Step until nothing is unfinished; every request must finish without an error.
    With commit, each finished turn is committed at once, as the service would."""
    finished: dict[int, FinishEvent] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finished
        outputs: list[RequestOutput] = engine.step()
        for out in outputs:
            assert out.error is None, out.error
            for event in out.events:
                if isinstance(event, FinishEvent):
                    finished[out.seq_id] = event
                    if commit:
                        engine.commit_turn(out.thread_key)
    raise AssertionError("the engine did not finish")


def play_changing_batches(engine: LLMEngine) -> list[torch.Tensor]:
    """Three turns of three threads: 3, then 1, then 2 decoding together. Returns every
    step's sampled logits."""
    logits: list[torch.Tensor] = []
    engine.on_logits = lambda seqs, step_logits: logits.append(step_logits.clone())
    history = {f"t{i}": [] for i in range(3)}
    for turn, threads in enumerate((["t0", "t1", "t2"], ["t1"], ["t2", "t0"])):
        for n, key in enumerate(threads):
            params = SamplingParams(max_tokens=4 + n, temperature=0.0, ignore_eos=True)
            new = [(7 * turn + 3 * n + j) % 90 + 1 for j in range(5 + 2 * n)]
            engine.add_request(key, history[key], new, params, first_turn=turn == 0)
            history[key] = history[key] + new
        while engine.has_unfinished():
            engine.step()
        for key in threads:
            engine.commit_turn(key)
    return logits


def count_replays(steps) -> list[tuple[int, int, int]]:
    """Every step a StepCache (network/compiled_step.py) runs, as (tokens, sequences, longest
    query), appended as it runs."""
    replays = []
    original = steps.run

    def run(ids, positions, meta, attn):
        replays.append((ids.shape[0], meta.seq_lens.shape[0], meta.max_seqlen_q))
        return original(ids, positions, meta, attn)

    steps.run = run
    return replays


def count_fused(engine: LLMEngine) -> list[int]:
    """The batch size of every step the runner's fused decode layers (network/fused_decode.py)
    ran, appended as they run."""
    fused, runs = engine.runner.fused, []
    original = fused.run

    def run(ids, positions):
        hidden = original(ids, positions)
        if hidden is not None:
            runs.append(ids.shape[0])
        return hidden

    fused.run = run
    return runs

import pytest
import torch

from app.engine.runtime.sampler import sample, validate_params
from app.engine.runtime.types import SamplingParams


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert sample(logits, params, gens([0, 1])).tolist() == [1, 0]


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.5, top_k=1)] * 3 + [
        SamplingParams(temperature=1.5, top_p=1e-6)
    ] * 3
    assert sample(logits, params, gens(range(6))).tolist() == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_alone_or_batched():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=7, seed=2),
        SamplingParams(temperature=1.0, top_p=0.7, seed=3),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=4),
    ]
    seeds = [1, 0, 2, 3, 4]
    batched = sample(logits, params, gens(seeds)).tolist()
    alone = [sample(logits[i : i + 1], [params[i]], gens([seeds[i]])).item() for i in range(5)]
    assert batched == alone


def frequencies(logits_row, params, n=4000):
    logits = logits_row.repeat(n, 1)
    picked = sample(logits, [params] * n, gens(range(n)))
    return torch.bincount(picked, minlength=logits.shape[1]).float() / n


def test_draws_follow_the_tempered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    got = frequencies(logits, SamplingParams(temperature=1.0))
    torch.testing.assert_close(got, probs, atol=0.03, rtol=0)
    # Temperature 0.5 squares the probabilities (renormalised).
    sharp = probs**2 / (probs**2).sum()
    got = frequencies(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(got, sharp, atol=0.03, rtol=0)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    got = frequencies(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)
    # top_p 0.6: tokens 0 (mass before it 0) and 1 (0.5 < 0.6) stay; token 2 (0.8) goes.
    got = frequencies(logits, SamplingParams(temperature=1.0, top_p=0.6))
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)
    assert got[2:].sum() == 0


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(stop=("",)), "stop"),
    ],
)
def test_bad_params_are_refused_by_name(params, field):
    with pytest.raises(ValueError, match=field):
        validate_params(params)

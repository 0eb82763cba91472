"""The plain decode loop's token draw: the warped distribution, nothing cut by top-p ever drawn.

Greedy equality with per-row ``generate`` (which checks the loop, its cache and its
row dropping) is tests/test_generate.py::test_shared_prefill_gives_the_per_row_greedy_tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from explore_persona_space.decode import draw, nucleus
from explore_persona_space.sampling import SamplingConfig

LOGITS = [2.0, 1.5, 0.3, 0.0, -1.0, -3.0]


def expected(temperature: float, top_p: float) -> list[float]:
    """Softmax at ``temperature``, then the smallest most-probable set with mass >= top_p, renormalised."""
    weights = [math.exp(x / temperature) for x in LOGITS]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.6)])
def test_draws_follow_the_warped_distribution(temperature, top_p):
    cfg = SamplingConfig(temperature=temperature, top_p=top_p)
    n = 60_000
    logits = torch.tensor([LOGITS] * n)
    tokens = draw(logits, cfg, torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    for count, p in zip(counts, expected(temperature, top_p), strict=True):
        if p == 0:
            assert count == 0  # cut by top-p: never drawn
        else:  # within 5 binomial standard deviations
            assert abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_greedy_takes_the_argmax_and_draws_repeat_for_a_seed():
    logits = torch.tensor([LOGITS, list(reversed(LOGITS))])
    assert draw(logits, SamplingConfig(temperature=0.0), None).tolist() == [0, len(LOGITS) - 1]
    cfg = SamplingConfig()
    first = draw(logits.repeat(50, 1), cfg, torch.Generator().manual_seed(9))
    again = draw(logits.repeat(50, 1), cfg, torch.Generator().manual_seed(9))
    assert torch.equal(first, again) and len(set(first.tolist())) > 1


def test_nucleus_keeps_what_transformers_top_p_keeps():
    """Peaked rows (the 64 candidates decide) and flat rows (sorted in full) in one batch."""
    from transformers.generation.logits_process import TopPLogitsWarper

    noise = torch.randn((6, 5000), generator=torch.Generator().manual_seed(1))
    logits = noise * torch.tensor([[6.0]] * 3 + [[0.5]] * 3)
    probs = torch.softmax(logits, dim=-1)
    for top_p in (0.5, 0.9, 0.95):
        covered = (probs.topk(64).values.sum(-1) >= top_p).tolist()
        assert covered == [True] * 3 + [False] * 3  # both paths taken
        reference = TopPLogitsWarper(top_p)(None, logits.clone()) > -math.inf
        kept = nucleus(probs, top_p, candidates=64)
        assert torch.equal(kept > 0, reference)
        assert torch.equal(kept[reference], probs[reference])  # kept tokens keep their probability

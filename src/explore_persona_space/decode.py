"""The plain (CPU) decode loop: finished rows leave the batch, one inverse-CDF draw per row.

``transformers``' ``generate`` keeps every row in the batch until the last one
stops, so a batch whose answers are mostly short (a coupled model's eval: 441
new tokens over 72 rows of at most 24 on the #247 smoke) still pays for every
row at every step, and it draws each token with ``torch.multinomial``, which on
CPU costs ~90 ms per step for 64 rows over a 49k vocabulary (an exponential
variate per vocabulary entry). This loop drops a row (and its KV cache row) at
its stop token and draws each token by inverting the cumulative distribution
with one uniform variate per row (~3 ms).

The distribution is ``generate``'s: logits divided by the temperature, the
top-p nucleus by transformers' rule (:func:`nucleus`, without sorting the whole
vocabulary where the 1,024 most probable tokens decide it), temperature 0 the
argmax. The draws differ from ``generate``'s (another use of the random
stream); greedy decoding gives the same tokens, which tests/test_generate.py
checks against per-row ``generate``, and tests/test_decode.py checks the
draws' frequencies and the nucleus against transformers' ``TopPLogitsWarper``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from explore_persona_space.sampling import SamplingConfig


def nucleus(probs: Any, top_p: float, candidates: int = 1024) -> Any:
    """``probs`` (rows x vocabulary) with every token outside the top-p nucleus set to 0.

    transformers' ``TopPLogitsWarper`` rule: a token stays when the tokens more probable
    than it hold less than ``top_p`` of the mass (so the most probable always stays). It
    sorts the whole vocabulary every step (~150 ms for 72 rows over 49k tokens on
    2 cores); here a row's ``candidates`` most probable tokens decide where they hold at
    least ``top_p`` (~96% of the embedded model's rows at 0.95), and only the other rows
    are sorted in full. Rounding can move a token whose preceding mass is within float
    error of ``top_p`` across the boundary.
    """
    import torch

    def kept(values: Any, index: Any) -> Any:
        ahead = values.cumsum(-1) - values  # the mass of the tokens ranked before each; 0 for the first
        return torch.zeros((values.size(0), probs.size(-1)), dtype=probs.dtype, device=probs.device).scatter_(
            -1, index, values * (ahead < top_p)
        )

    k = min(candidates, probs.size(-1))
    values, index = probs.topk(k, dim=-1)
    out = kept(values, index)
    short = (values.sum(-1) < top_p).nonzero().squeeze(-1) if k < probs.size(-1) else []
    if len(short):
        out[short] = kept(*probs[short].sort(dim=-1, descending=True))
    return out


def draw(logits: Any, cfg: SamplingConfig, generator: Any) -> Any:
    """One token id per row of ``logits`` (rows x vocabulary): argmax at temperature 0, else sampled.

    Sampling divides by the temperature, applies :func:`nucleus` when ``top_p < 1``,
    and inverts the row's cumulative distribution (float64) at one uniform variate;
    tokens of probability zero are never drawn.
    """
    import torch

    scores = logits.float()
    if cfg.temperature == 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        probs = nucleus(probs, cfg.top_p)
    cdf = probs.double().cumsum(-1)
    u = torch.rand((cdf.size(0), 1), generator=generator, dtype=torch.float64, device=cdf.device)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return picked.squeeze(-1).clamp(max=cdf.size(-1) - 1)


def decode(
    model: Any, ids: Any, mask: Any, cache: Any, cfg: SamplingConfig, stops: Sequence[int], seed: int
) -> list[list[int]]:
    """New tokens per row (up to and including its stop token, at most ``cfg.max_new_tokens``).

    ``ids``/``mask`` are the left-padded prompts (rows x width); ``cache`` holds
    every prompt token but the last (a ``DynamicCache``, empty for one-token
    prompts), which is where each row's first step starts.
    """
    import torch

    device = ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(ids.size(0))]
    live = list(range(ids.size(0)))  # the original row of each batch row
    step_ids, attn = ids[:, -1:], mask
    positions = mask.sum(-1, keepdim=True) - 1
    for step in range(cfg.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        tokens = draw(logits, cfg, generator)
        for row, token in zip(live, tokens.tolist(), strict=True):
            out[row].append(token)
        if step + 1 == cfg.max_new_tokens:
            break
        going = (~torch.isin(tokens, stop_ids)).nonzero().squeeze(-1)
        if going.numel() == 0:
            break
        if going.numel() < len(live):  # stopped rows leave the batch and the cache
            cache.batch_select_indices(going)
            live = [live[k] for k in going.tolist()]
            tokens, attn, positions = tokens[going], attn[going], positions[going]
        attn = torch.cat([attn, attn.new_ones((attn.size(0), 1))], dim=-1)
        step_ids, positions = tokens[:, None], positions + 1
    return out

"""Sampling completions: one call for eval generations and on-policy training data.

``generate`` renders every (persona, question) prompt with the tokenizer's own
chat template (:func:`models.render_prompt`), tokenizes it once without adding
special tokens (the template already holds them), and hands the same token ids
to either backend, so both see identical inputs and stop on the same token set
(the end-of-turn token plus every EOS id the tokenizer and generation config
name). Records come back in the raw-completions format of :mod:`results`, in
the order of the prompts given, then sample index, whatever order the backend
worked in.

Backends:

* ``transformers`` (CPU, tests, any machine without vLLM): rows (prompt x
  sample) sorted by prompt length, left-padded, batched; off CUDA each prompt is
  read once and :mod:`decode`'s loop samples its rows. On CUDA it decodes
  fast (``SamplingConfig.fast_decode``): a static KV cache, which transformers
  compiles into CUDA graphs, batches of ``fast_batch_size`` rows in one fixed
  shape, and grouped-head decode attention (:mod:`fast_attention`); all three
  change how the same distribution is computed, not what it is. An adapter is
  attached with PEFT and, on fp32 weights (CPU), folded into them in memory
  (:func:`train.load_for_inference`: the same weights up to fp32 rounding, and
  faster); on bf16 it stays attached, where a merge would round. Sampling
  settings are passed in full (``top_k=0``, ``repetition_penalty=1.0``) because
  transformers would otherwise fill unset ones from the model's
  ``generation_config.json`` and its own defaults (top-k 50; Qwen2.5 ships
  top-k 20 and a repetition penalty), which would
  silently change the protocol's temperature-1.0, top-p-1.0 distribution.
* ``vllm`` (GPU pods): see :mod:`explore_persona_space.generate_vllm`.

Seeds and determinism: the transformers backend seeds its sampler once per
batch from ``derive_seed(seed, ...)`` (a ``torch.Generator`` of its own in the
plain decode loop, :mod:`decode`; the global torch seed on the fast path), so a
run repeats exactly for the same prompts, config and device. vLLM seeds every
(persona, question, sample) request on its own, but its kernels are not
batch-invariant: runs repeat exactly only with ``VLLMOptions(deterministic=True)``
(see :mod:`generate_vllm`). The two
backends draw different, equally distributed samples for the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.decode import decode
from explore_persona_space.models import (
    keep_resident,
    load_tokenizer,
    pick_device,
    resident_model,
)
from explore_persona_space.personas import persona_prompt
from explore_persona_space.results import validate_raw_completions
from explore_persona_space.sampling import (
    BACKENDS,
    Completion,
    Prompt,
    SampleFn,
    SamplingConfig,
    encode_prompts,
    stop_token_ids,
)
from explore_persona_space.seeds import derive_seed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from explore_persona_space.generate_vllm import VLLMOptions

# The shared types are re-exported: callers import them from here.
__all__ = [
    "BACKENDS",
    "Completion",
    "Prompt",
    "SampleFn",
    "SamplingConfig",
    "encode_prompts",
    "generate",
    "hf_sample",
    "left_padded",
    "persona_prompts",
    "pick_backend",
    "stop_token_ids",
    "vllm_available",
]

log = logging.getLogger(__name__)


def persona_prompts(
    personas: Sequence[str], questions: Sequence[str], *, no_system: bool = False
) -> list[Prompt]:
    """Every persona x question, persona-major. ``no_system`` sends no system prompt at all
    (the #205 "assistant, no explicit system message" condition) but keeps the persona label."""
    return [
        Prompt(persona=p, question=q, system=None if no_system else persona_prompt(p))
        for p in personas
        for q in questions
    ]


def vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick_backend(backend: str = "auto") -> str:
    """``auto`` is vLLM iff it is importable and CUDA is present; a forced ``vllm`` must be installable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                "backend 'vllm' was asked for but vllm is not installed; on a GPU pod run "
                "`uv sync --extra vllm`, or use backend='transformers'"
            )
    return backend


def _check_prompts(prompts: Sequence[Prompt]) -> None:
    seen: set[tuple[str, str]] = set()
    for p in prompts:
        key = (p.persona, p.question)
        if key in seen:
            raise ValueError(f"duplicate prompt (persona={p.persona!r}, question={p.question[:60]!r})")
        seen.add(key)


def generate(
    model: str | Path | PreTrainedModel,
    prompts: Sequence[Prompt],
    cfg: SamplingConfig,
    *,
    adapter: Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    retry_empty: int = 0,
    vllm_kwargs: dict[str, Any] | None = None,
    vllm: VLLMOptions | None = None,
) -> list[dict[str, Any]]:
    """Sample ``cfg.n_samples`` completions for every prompt; records in prompt order, then sample.

    ``model`` is an alias, hub id or local directory, or an already-loaded
    transformers model (then ``tokenizer`` is required and the backend is
    transformers), so a caller can keep base weights resident between calls.
    ``adapter`` is a saved LoRA directory applied on top. ``retry_empty`` re-draws
    whitespace-only completions up to that many times with derived seeds (for
    on-policy data; eval keeps empties, they are real samples); those still empty
    are kept and counted in a warning. ``vllm`` says how the vLLM engine starts
    (memory share, batch-invariant mode); ``vllm_kwargs`` go to ``vllm.LLM`` as
    they are and win over it.
    """
    prompts = list(prompts)
    _check_prompts(prompts)
    preloaded = not isinstance(model, (str, Path))
    if preloaded and tokenizer is None:
        raise ValueError("a preloaded model needs its tokenizer: pass tokenizer=")
    chosen = "transformers" if preloaded and backend == "auto" else pick_backend(backend)
    if preloaded and chosen != "transformers":
        raise ValueError("a preloaded model runs on the transformers backend only; pass a name or path")
    if not prompts:
        return []
    if chosen == "vllm":
        from explore_persona_space.generate_vllm import vllm_sampler

        sample_fn, close = vllm_sampler(str(model), prompts, cfg, adapter, dtype, progress, vllm_kwargs, vllm)
    else:
        sample_fn, close = _transformers_sampler(
            model, prompts, cfg, adapter, device, dtype, tokenizer, progress
        )
    try:
        done = _sample_all(sample_fn, len(prompts), cfg.n_samples, retry_empty)
    finally:
        close()
    records = [
        {"persona": p.persona, "question": p.question, "sample": s, **vars(done[(i, s)])}
        for i, p in enumerate(prompts)
        for s in range(cfg.n_samples)
    ]
    return validate_raw_completions(records, f"generate({chosen})")


def _sample_all(
    sample_fn: SampleFn, n_prompts: int, n_samples: int, retry_empty: int
) -> dict[tuple[int, int], Completion]:
    rows = [(i, s) for i in range(n_prompts) for s in range(n_samples)]
    done = dict(zip(rows, sample_fn(rows, 0), strict=True))
    for attempt in range(1, retry_empty + 1):
        empty = [row for row, c in done.items() if not c.text.strip()]
        if not empty:
            break
        log.info("re-drawing %d empty completions (attempt %d of %d)", len(empty), attempt, retry_empty)
        done.update(zip(empty, sample_fn(empty, attempt), strict=True))
    if retry_empty:
        still = sum(1 for c in done.values() if not c.text.strip())
        if still:
            log.warning(
                "%d of %d completions are still empty after %d re-draws; kept for the caller to filter",
                still,
                len(done),
                retry_empty,
            )
    return done


def _transformers_sampler(
    model: str | Path | PreTrainedModel,
    prompts: Sequence[Prompt],
    cfg: SamplingConfig,
    adapter: Path | None,
    device: str | None,
    dtype: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    progress: bool,
) -> tuple[SampleFn, Callable[[], None]]:
    if tokenizer is None:
        tokenizer = load_tokenizer(str(model))
    attached = False
    if isinstance(model, (str, Path)) and keep_resident(pick_device(device)):
        model = resident_model(str(model), device=pick_device(device), dtype=dtype)
    if isinstance(model, (str, Path)):
        from explore_persona_space.train import load_for_inference

        model = load_for_inference(str(model), adapter, device=device, dtype=dtype)
    elif adapter is not None:  # attach to the caller's resident model; detached again in close()
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        attached = True
    model.eval()
    encoded = encode_prompts(tokenizer, prompts)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def sample(rows: Sequence[tuple[int, int]], attempt: int) -> list[Completion]:
        return hf_sample(model, tokenizer, encoded, rows, attempt, cfg, stops, pad_id, progress)

    def close() -> None:
        if attached:
            model.unload()  # the caller's base model gets its own modules back

    return sample, close


def hf_sample(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int]],
    attempt: int,
    cfg: SamplingConfig,
    stops: Sequence[int],
    pad_id: int,
    progress: bool,
) -> list[Completion]:
    """The transformers backend's sampling loop over ``rows`` (prompt index, sample index).

    Public so the GPU benchmark times exactly this loop on a random-weight model.
    """
    import torch
    from tqdm.auto import tqdm

    from explore_persona_space.fast_attention import grouped_decode_attention

    device = next(model.parameters()).device
    fast = device.type == "cuda" if cfg.fast_decode is None else cfg.fast_decode
    if not fast and cfg.shared_prefill is not False:
        return _shared_prefill_sample(model, tokenizer, encoded, rows, attempt, cfg, stops, pad_id, progress)
    size = cfg.fast_batch_size if fast else cfg.batch_size
    order = sorted(range(len(rows)), key=lambda k: (len(encoded[rows[k][0]]), k))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    out: list[Completion | None] = [None] * len(rows)
    options = _hf_sampling_options(cfg)
    if fast:
        options["cache_implementation"] = "static"
    widest = max(len(encoded[i]) for i, _ in rows) if rows else 0
    stop_set = set(stops)
    with grouped_decode_attention(model, enabled=fast):
        for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
            seqs = [encoded[rows[k][0]] for k in batch]
            # Fast decode keeps one shape for the whole call (every batch as wide as the widest
            # prompt, the last one filled up with throwaway rows) so the compiled step is reused.
            width = widest if fast else max(len(s) for s in seqs)
            filler = size - len(seqs) if fast and len(batches) > 1 else 0
            ids, mask = left_padded([*seqs, *[seqs[-1]] * filler], width, pad_id)
            torch.manual_seed(derive_seed(cfg.seed, "transformers", attempt, b))
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=cfg.max_new_tokens,
                    eos_token_id=list(stops),
                    pad_token_id=pad_id,
                    **options,
                )
            for r, k in enumerate(batch):
                out[k] = _hf_completion(gen[r, width:].tolist(), len(seqs[r]), stop_set, tokenizer)
    return [c for c in out if c is not None]


def prefill_batches(lengths: Mapping[int, int], counts: Mapping[int, int], max_rows: int) -> list[list[int]]:
    """Prompt indices grouped for shared prefill: by length, <= ``max_rows`` sampled rows per group.

    Groups end only on the row budget (a prompt's samples are never split). Splitting
    also where prompt lengths spread (an earlier rule: longest > 1.25 x shortest) saved
    padded prefill tokens but cost a whole extra decode loop per group: on the #261 smoke
    eval (66 rows, <= 40 new tokens, 2 CPU cores) it took 58.6 s against 42.4 s unsplit.
    """
    groups: list[list[int]] = []
    rows = 0
    for i in sorted(lengths, key=lambda i: (lengths[i], i)):
        if groups and rows + counts[i] <= max_rows:
            groups[-1].append(i)
            rows += counts[i]
        else:
            groups.append([i])
            rows = counts[i]
    return groups


def _shared_prefill_sample(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int]],
    attempt: int,
    cfg: SamplingConfig,
    stops: Sequence[int],
    pad_id: int,
    progress: bool,
) -> list[Completion]:
    """The plain decode path with each prompt read once, however many samples it has.

    A prompt's samples share everything up to their first sampled token, so the
    prompt (all but its last token) goes through the model once per group and
    its KV cache is copied to each of its rows (``DynamicCache.batch_select_indices``);
    :func:`decode.decode` then reads the last prompt token per row and samples, dropping
    each row from the batch at its stop token. On CPU,
    where eval prompts are about twice as long as smoke completions, this halves
    the prefill at two samples per prompt and cuts it tenfold at ten. The
    distribution is the one per-row prompts give (the same model, the same
    positions and mask); the draws differ because the rows are batched
    differently. Rows come back in the order given.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = next(model.parameters()).device
    by_prompt: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(rows):
        by_prompt.setdefault(i, []).append(k)
    lengths = {i: len(encoded[i]) for i in by_prompt}
    groups = prefill_batches(lengths, {i: len(ks) for i, ks in by_prompt.items()}, cfg.batch_size)
    out: list[Completion | None] = [None] * len(rows)
    stop_set = set(stops)
    for b, group in enumerate(tqdm(groups, desc="generate", unit="batch", disable=not progress)):
        width = max(lengths[i] for i in group)
        ids, mask = left_padded([encoded[i] for i in group], width, pad_id)
        expand = [n for n, i in enumerate(group) for _ in by_prompt[i]]
        index = torch.tensor(expand, dtype=torch.long, device=device)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            if width > 1:
                prefix_mask = mask[:, :-1].to(device)
                model(
                    input_ids=ids[:, :-1].to(device),
                    attention_mask=prefix_mask,
                    position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache.batch_select_indices(index)
            seed = derive_seed(cfg.seed, "transformers", attempt, b)
            new = decode(model, ids.to(device)[index], mask.to(device)[index], cache, cfg, stops, seed)
        for r, k in enumerate(k for i in group for k in by_prompt[i]):
            out[k] = _hf_completion(new[r], lengths[rows[k][0]], stop_set, tokenizer)
    return [c for c in out if c is not None]


def left_padded(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[Any, Any]:
    """Ids and attention mask, left-padded so every row's last token sits in the last column."""
    import torch

    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


def _hf_sampling_options(cfg: SamplingConfig) -> dict[str, Any]:
    if cfg.temperature == 0:
        return {"do_sample": False, "num_beams": 1}
    # Explicit top_k/repetition_penalty: unset values would come from the model's generation_config.
    return {
        "do_sample": True,
        "num_beams": 1,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": 0,
        "repetition_penalty": 1.0,
    }


def _hf_completion(
    new: list[int], n_prompt: int, stops: set[int], tokenizer: PreTrainedTokenizerBase
) -> Completion:
    """Cut at the first stop token (rows that stopped early are padded after it) and decode."""
    cut = next((j for j, t in enumerate(new) if t in stops), None)
    kept = new if cut is None else new[: cut + 1]
    return Completion(
        text=tokenizer.decode(kept, skip_special_tokens=True),
        prompt_tokens=n_prompt,
        completion_tokens=len(kept),
        finish_reason="length" if cut is None else "stop",
    )

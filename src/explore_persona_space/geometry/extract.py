"""Hidden states per persona x question at chosen layers (Methods A and B), stored as safetensors.

One forward pass per batch serves both methods: the prompt (rendered with the
tokenizer's own chat template, exactly as generation renders it) followed by the
greedy response's tokens, right-padded, with the model's own
``output_hidden_states``. Method A reads the last prompt token, Method B averages
the response tokens. No hooks: ``output_hidden_states`` keeps every layer of the
batch, which for a 7B model at 16 rows of ~700 tokens is ~2.5 GB in bf16, and
``logits_to_keep=1`` skips the vocabulary projection of every other position
(~3.4 GB saved at that size, the larger cost). The same code runs on CPU and CUDA.

Layers are named as in write-up 003 (layers of the 28-layer Qwen2.5-7B) and
mapped to another depth by relative depth (:func:`map_layers`). A layer number
indexes ``hidden_states``: 0 is the embedding output, ``i`` the output of decoder
block ``i`` (1-based), so the write-up's layer 27 is the output of block 27 of 28
- not the last entry, which transformers returns after the final norm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from explore_persona_space.models import end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from explore_persona_space.sampling import Prompt

log = logging.getLogger(__name__)

WRITEUP_DEPTH = 28  # Qwen2.5-7B-Instruct, the model write-up 003 named its layers on
WRITEUP_LAYERS = (7, 14, 20, 21, 27)
METHODS = ("A", "B")  # A: last input token; B: mean over the greedy response's tokens
VECTORS = "vectors.safetensors"


def map_layers(layers: Sequence[int], n_layers: int, reference_depth: int = WRITEUP_DEPTH) -> dict[int, int]:
    """``{written layer: hidden_states index}`` for a model with ``n_layers`` decoder blocks.

    Relative depth ``layer / reference_depth`` times ``n_layers``, rounded half up
    (the embedded 30-layer model: 7, 14, 20, 21, 27 -> 8, 15, 21, 23, 29). Two
    written layers landing on one index would silently merge two rows of every
    table, so that is an error.
    """
    if n_layers < 1 or reference_depth < 1:
        raise ValueError(f"depths must be positive: n_layers={n_layers}, reference_depth={reference_depth}")
    mapping: dict[int, int] = {}
    for layer in layers:
        if not 1 <= layer <= reference_depth:
            raise ValueError(f"layer {layer} is outside 1..{reference_depth}")
        mapping[int(layer)] = math.floor(layer * n_layers / reference_depth + 0.5)
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"layers {list(layers)} collide on a {n_layers}-layer model: {mapping}")
    return mapping


def persona_states(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    indices: Sequence[int],
    *,
    responses: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Hidden states at ``hidden_states[i]`` for ``i`` in ``indices``, one row per prompt, in order.

    Returns ``{"A": [N, layers, hidden]}`` (plus ``"B"`` when ``responses`` are given,
    one per prompt) in float32, and the number of response tokens each B row
    averages. An empty response is represented by the end-of-turn token the model
    emitted instead (its whole answer); the caller counts those.
    """
    import torch
    from tqdm.auto import tqdm

    from explore_persona_space.sampling import encode_prompts

    prompt_ids = encode_prompts(tokenizer, prompts)
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    if responses is None:
        response_ids: list[list[int]] = [[] for _ in prompts]
    else:
        response_ids = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) or [eot] for r in responses]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    device = next(model.parameters()).device
    n, width_of = len(prompts), [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    order = sorted(range(n), key=lambda i: (width_of[i], i))
    out: dict[str, np.ndarray] = {}
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="hidden states", unit="batch", disable=not progress):
            width = max(width_of[i] for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = prompt_ids[i] + response_ids[i]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            res = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
            )
            states = torch.stack([res.hidden_states[i] for i in indices], dim=1)  # [b, layers, T, H]
            if not out:
                shape = (n, len(indices), states.shape[-1])
                out = {
                    m: np.zeros(shape, dtype=np.float32) for m in ("A", "B")[: 1 + (responses is not None)]
                }
            for r, i in enumerate(batch):
                p, k = len(prompt_ids[i]), len(response_ids[i])
                out["A"][i] = states[r, :, p - 1].float().cpu().numpy()
                if responses is not None:
                    out["B"][i] = states[r, :, p : p + k].float().mean(dim=1).cpu().numpy()
    return out, np.array([len(r) for r in response_ids], dtype=np.int64)


@contextlib.contextmanager
def loaded_model(base: str, adapter: str | None, device: str | None) -> Iterator[Any]:
    """The model (base + adapter, unmerged) in eval mode; the resident base is reused where kept."""
    from explore_persona_space.models import keep_resident, load_model, pick_device, resident_model

    dev = pick_device(device)
    if keep_resident(dev):
        model = resident_model(base, device=dev)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        try:
            yield model.eval()
        finally:
            if adapter is not None:
                model.unload()  # the resident base gets its own modules back
        return
    if adapter is not None:
        from explore_persona_space.train import load_with_adapter

        yield load_with_adapter(base, Path(adapter), device=dev)
    else:
        yield load_model(base, device=dev).eval()


def extract(
    base: str,
    adapter: str | None,
    prompts: Sequence[Prompt],
    layers: Sequence[int],
    out: Path,
    *,
    reference_depth: int = WRITEUP_DEPTH,
    responses: Sequence[str] | None = None,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Hidden states of every prompt at the mapped ``layers`` into ``out`` (safetensors); its summary.

    ``prompts`` are persona-major over one question list (as ``persona_prompts`` makes
    them), so the stored arrays are ``[personas, questions, layers, hidden]``.
    """
    from explore_persona_space.models import load_tokenizer

    personas = list(dict.fromkeys(p.persona for p in prompts))
    questions = list(dict.fromkeys(p.question for p in prompts))
    expected = [(p, q) for p in personas for q in questions]
    if [(p.persona, p.question) for p in prompts] != expected:
        raise ValueError("prompts must be every persona x every question, persona-major")
    tokenizer = load_tokenizer(base)
    with loaded_model(base, adapter, device) as model:
        mapping = map_layers(layers, model.config.num_hidden_layers, reference_depth)
        log.info("layers (written -> hidden_states index): %s", mapping)
        flat, n_tokens = persona_states(
            model, tokenizer, prompts, list(mapping.values()), responses=responses,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        n_layers, hidden = model.config.num_hidden_layers, int(next(iter(flat.values())).shape[-1])
    shape = (len(personas), len(questions), len(mapping), hidden)
    states = {m: a.reshape(shape) for m, a in flat.items()}
    meta = {
        "personas": personas,
        "n_questions": len(questions),
        "layers": list(mapping),
        "layer_index": {str(k): v for k, v in mapping.items()},
        "n_layers": n_layers,
        "reference_depth": reference_depth,
        "hidden_size": hidden,
        "methods": list(states),
    }
    save_vectors(out, states, meta)
    summary: dict[str, Any] = {**meta, "file": out.name}
    if responses is not None:
        summary["response_tokens_mean"] = float(n_tokens.mean())
        summary["empty_responses"] = sum(
            1 for r in responses if not tokenizer(r, add_special_tokens=False)["input_ids"]
        )
    return summary


def save_vectors(path: Path, states: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """``<m>`` = per-question states ``[P, Q, L, H]`` and ``<m>.persona`` = their mean over questions.

    Written to a temporary name and renamed, like every result file.
    """
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for method, array in states.items():
        if array.ndim != 4:
            raise ValueError(
                f"method {method}: expected [personas, questions, layers, hidden], got {array.shape}"
            )
        tensors[method] = np.ascontiguousarray(array, dtype=np.float32)
        tensors[f"{method}.persona"] = np.ascontiguousarray(array.mean(axis=1), dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"meta": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_vectors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`save_vectors` wrote: the arrays by name and the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        arrays = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    return arrays, meta

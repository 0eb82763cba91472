"""Hidden states per persona x question at chosen layers (Methods A and B), stored as safetensors.

One greedy generation per batch serves both methods, through the model's own
``generate(..., output_hidden_states=True)`` (no hooks): its first step runs the
whole prompt (rendered with the tokenizer's own chat template, left-padded, as
the sampling backend renders it), and every later step runs the response token
the model just chose. Method A reads the last prompt token of the first step;
Method B averages the response tokens the model read back: every token of an
answer that stopped (the stop token itself is never read back), every token but
the last of one cut at ``max_new_tokens``. An answer that is only the stop token
has no response token; its B is its A state, and the stage counts those rows.
Generating and reading in one pass halves the CPU cost of a separate
teacher-forced pass; ``generate`` keeps only the last position's logits. The
same code runs on CPU and CUDA (no vLLM: vLLM returns no hidden states).

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

from explore_persona_space.sampling import Completion

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
    max_new_tokens: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], list[Completion]]:
    """Hidden states at ``hidden_states[i]`` for ``i`` in ``indices``, one row per prompt, in order.

    Returns ``{"A": [N, layers, hidden]}`` in float32 - plus ``"B"`` when
    ``max_new_tokens > 0`` - and the greedy completions (empty texts for A only).
    ``Completion.completion_tokens`` counts the response tokens B averaged.
    """
    import torch
    from tqdm.auto import tqdm

    from explore_persona_space.sampling import encode_prompts, stop_token_ids

    encoded = encode_prompts(tokenizer, prompts)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    out: dict[str, np.ndarray] = {}
    done: list[Completion | None] = [None] * len(encoded)
    with torch.no_grad():
        for batch in tqdm(batches, desc="hidden states", unit="batch", disable=not progress):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, width - len(encoded[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max(1, max_new_tokens), do_sample=False, num_beams=1, eos_token_id=stops,
                pad_token_id=pad, output_hidden_states=True, return_dict_in_generate=True,
                repetition_penalty=1.0,  # plain argmax, whatever the model's generation_config says
            )  # fmt: skip
            # steps[s]: [b, layers, positions, H]; step 0 holds the prompt, step s > 0 the token read back.
            steps = [torch.stack([h[i] for i in indices], dim=1) for h in gen.hidden_states]
            if not out:
                shape = (len(encoded), len(indices), steps[0].shape[-1])
                out = {m: np.zeros(shape, dtype=np.float32) for m in ("A", "B")[: 1 + (max_new_tokens > 0)]}
            new = gen.sequences[:, width:].tolist()
            for r, i in enumerate(batch):
                a, b, done[i] = _row(steps, r, new[r], stops, max_new_tokens > 0, len(encoded[i]), tokenizer)
                out["A"][i] = a
                if b is not None:
                    out["B"][i] = b
    return out, [c for c in done if c is not None]


def _row(
    steps: list[Any],
    r: int,
    new: list[int],
    stops: Sequence[int],
    with_b: bool,
    n_prompt: int,
    tokenizer: Any,
) -> tuple[np.ndarray, np.ndarray | None, Completion]:
    """Row ``r`` of a generated batch: its A state, its B state (None without B) and its completion."""
    import torch

    a = steps[0][r, :, -1].float()
    if not with_b:
        return a.cpu().numpy(), None, Completion("", n_prompt, 0, "")
    cut = next((j for j, t in enumerate(new) if t in stops), None)
    text = new if cut is None else new[:cut]
    read = min(len(text), len(steps) - 1)  # response tokens read back: steps 1..read
    b = torch.stack([steps[s][r, :, 0].float() for s in range(1, read + 1)]).mean(0) if read else a
    finish = "length" if cut is None else "stop"
    completion = Completion(tokenizer.decode(text, skip_special_tokens=True), n_prompt, read, finish)
    return a.cpu().numpy(), b.cpu().numpy(), completion


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
    max_new_tokens: int = 0,
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Hidden states of every prompt at the mapped ``layers`` into ``out`` (safetensors).

    ``prompts`` are persona-major over one question list (as ``persona_prompts`` makes
    them), so the stored arrays are ``[personas, questions, layers, hidden]``;
    ``max_new_tokens > 0`` adds Method B. Returns the stage summary and the greedy
    responses as raw-completion records.
    """
    from explore_persona_space.models import load_tokenizer

    personas = list(dict.fromkeys(p.persona for p in prompts))
    questions = list(dict.fromkeys(p.question for p in prompts))
    if [(p.persona, p.question) for p in prompts] != [(p, q) for p in personas for q in questions]:
        raise ValueError("prompts must be every persona x every question, persona-major")
    tokenizer = load_tokenizer(base)
    with loaded_model(base, adapter, device) as model:
        n_layers = model.config.num_hidden_layers
        mapping = map_layers(layers, n_layers, reference_depth)
        log.info("layers (written -> hidden_states index): %s", mapping)
        flat, completions = persona_states(
            model, tokenizer, prompts, list(mapping.values()), max_new_tokens=max_new_tokens,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
    hidden = int(flat["A"].shape[-1])
    states = {m: a.reshape(len(personas), len(questions), len(mapping), hidden) for m, a in flat.items()}
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
    records = [
        {"persona": p.persona, "question": p.question, "sample": 0, **vars(c)}
        for p, c in zip(prompts, completions, strict=True)
    ]
    if max_new_tokens > 0:
        read = [c.completion_tokens for c in completions]
        summary["response_tokens_mean"] = float(np.mean(read))
        summary["no_response_tokens"] = sum(1 for n in read if n == 0)  # B = A for these rows
        summary["stopped"] = sum(1 for c in completions if c.finish_reason == "stop")
    return summary, records


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

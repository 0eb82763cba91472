"""A continuous leakage score: the teacher-forced log-probability of a marker where it would be emitted.

A binary marker rate counts completions that happened to sample the marker; at
smoke scale it rests on a handful of completions per persona and cannot rank
cells. This module asks the model directly how likely the marker is, with no
sampling: for every eval prompt and persona it scores the marker's tokens

* ``start`` - at the start of the answer: prompt (up to the assistant header) + marker;
  one value per (persona, question), shared by that prompt's samples;
* ``end`` - appended after each sampled completion, before the end-of-turn token:
  prompt + completion + ``sep`` + marker, the placement the coupling data trains
  (:func:`data.build_contrastive_dataset` appends ``"\\n\\n" + marker``); one value per completion.

A value is ``log P(marker | context)``, the sum of the marker tokens' log-probs
(natural log); its probability is ``exp`` of that. Each prompt is read once and its
key/value cache shared by its points' continuations, which are left-padded so the
marker sits in the last columns of every row; one batched forward pass that keeps
only those columns' logits scores each completion. The completion is
re-tokenized from its text (the sampled token ids are not stored), and the marker
is tokenized on its own, as it follows the newline of ``sep`` (or the assistant
header) in the chat template. A completion that hit the token limit is scored where it
was cut; one that already holds the marker is scored all the same.

:func:`summarize` gives per persona the mean log-prob and the mean probability
with question-cluster bootstrap CIs (questions resampled, as the two-marker CIs
do: completions of one question are not independent), the unweighted bystander
mean, the source-minus-bystander gap with its paired CI, and - from the firing
flags - the binary rate's gap with a CI of the same construction, so the two can
be compared on the same footing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from explore_persona_space.generate import left_padded, persona_prompts
from explore_persona_space.sampling import encode_prompts
from explore_persona_space.stats import cluster_bootstrap_ratio

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

POINTS: tuple[str, ...] = ("start", "end")
END_SEP = "\n\n"  # what the single-marker coupling data puts between a completion and its marker
RESULT_FILE = "marker_logprobs.json"


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, marker: str) -> list[int]:
    ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"marker {marker!r} has no tokens")
    return ids


def _prompt_ids(tokenizer, records, no_system: bool) -> dict[tuple[str, str], list[int]]:
    keys = list(dict.fromkeys((str(r["persona"]), str(r["question"])) for r in records))
    ids: dict[tuple[str, str], list[int]] = {}
    for persona, question in keys:
        prompt = persona_prompts([persona], [question], no_system=no_system)[0]
        ids[(persona, question)] = encode_prompts(tokenizer, [prompt])[0]
    return ids


def prefix_shared_logprobs(
    model: PreTrainedModel,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[tuple[int, Sequence[int]]],
    n_tail: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[float]:
    """``sum log P`` of the last ``n_tail`` tokens of each ``prefixes[j] + continuation``.

    ``continuations`` holds ``(j, ids)`` pairs, each ``ids`` longer than ``n_tail``.
    Each prefix goes through the model once; its key/value cache is copied to its
    continuations (``DynamicCache.batch_select_indices``). Prefixes are read in chunks
    of at most ``batch_size`` continuation rows (more only when one prefix has more
    continuations); a chunk's rows run as left-padded batches of similar length
    (:func:`length_groups`), with explicit positions and a mask that hides the padding
    between a prefix and its continuation. The same model, positions and mask as one
    unpadded pass per whole sequence; results come back in input order.
    """
    import torch
    from transformers import DynamicCache

    if any(len(ids) <= n_tail for _, ids in continuations):
        raise ValueError(f"every continuation needs a token before its {n_tail} scored tokens")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    device = next(model.parameters()).device
    rows_of: dict[int, list[int]] = {}
    for r, (j, _) in enumerate(continuations):
        rows_of.setdefault(j, []).append(r)
    order = sorted(rows_of, key=lambda j: (len(prefixes[j]), j))
    chunks: list[list[int]] = [[]]
    for j in order:  # whole prefixes per chunk, up to batch_size continuation rows
        if chunks[-1] and sum(len(rows_of[k]) for k in chunks[-1]) + len(rows_of[j]) > batch_size:
            chunks.append([])
        chunks[-1].append(j)
    out: list[float] = [0.0] * len(continuations)
    for chunk in chunks:
        width = max(len(prefixes[j]) for j in chunk)
        p_ids, p_mask = left_padded([prefixes[j] for j in chunk], width, pad_id)
        slot = {j: n for n, j in enumerate(chunk)}
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(
                input_ids=p_ids.to(device),
                attention_mask=p_mask.to(device),
                position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        size = lambda r: len(continuations[r][1])  # noqa: E731
        groups = length_groups(sorted((r for j in chunk for r in rows_of[j]), key=size), size)
        for g, rows in enumerate(groups):  # the last group takes the prefix cache itself, the others a copy
            own = cache if g == len(groups) - 1 else copy.deepcopy(cache)
            index = torch.tensor([slot[continuations[r][0]] for r in rows], dtype=torch.long)
            values = _score_rows(
                model, own, index, p_mask, [continuations[r][1] for r in rows], n_tail, pad_id
            )
            for r, value in zip(rows, values, strict=True):
                out[r] = value
    return out


def length_groups(rows: Sequence[int], length: Any, ratio: float = 2.0) -> list[list[int]]:
    """``rows`` (sorted by ``length``) split so no group holds a row over ``ratio`` x its shortest.

    A group is one left-padded batch, so this bounds the padding; the #247 smoke's
    6-token start rows and its 10-31-token end rows no longer share one width.
    """
    groups: list[list[int]] = []
    for r in rows:
        if groups and length(r) <= ratio * length(groups[-1][0]):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _score_rows(
    model, cache, index, p_mask, conts: Sequence[Sequence[int]], n_tail: int, pad_id: int
) -> list[float]:
    """``sum log P`` of each continuation's last ``n_tail`` tokens after prefix ``index`` of ``cache``."""
    import torch

    device = next(model.parameters()).device
    c_width = max(len(c) for c in conts)
    c_ids, c_mask = left_padded(conts, c_width, pad_id)
    mask = torch.cat([p_mask[index], c_mask], dim=1)
    positions = p_mask.sum(-1)[index, None] + (c_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache.batch_select_indices(index.to(device))
        logits = model(
            input_ids=c_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            logits_to_keep=n_tail + 1,
        ).logits
    logp = torch.log_softmax(logits[:, :n_tail].float(), dim=-1)
    target = c_ids[:, c_width - n_tail :].to(logp.device)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(dim=-1).tolist()


def score_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    marker: str,
    *,
    points: Sequence[str] = POINTS,
    sep: str = END_SEP,
    no_system: bool = False,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per record: persona, question, sample and ``log P(marker)`` at each point.

    A prompt is read once (:func:`prefix_shared_logprobs`): all of it but its last
    token is the shared prefix, and each point's sequence continues from there -
    ``[last prompt token] + marker`` for ``start`` (once per prompt), ``[last prompt
    token] + completion + sep + marker`` for ``end`` (once per completion).
    """
    unknown = set(points) - set(POINTS)
    if unknown or not points:
        raise ValueError(f"points must be among {POINTS}; got {list(points)}")
    tail = marker_token_ids(tokenizer, marker)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tail[0]
    prompts = _prompt_ids(tokenizer, records, no_system)
    keys = list(prompts)
    slot = {k: j for j, k in enumerate(keys)}
    rows = [
        {"persona": str(r["persona"]), "question": str(r["question"]), "sample": r.get("sample")}
        for r in records
    ]
    conts: list[tuple[int, list[int]]] = []
    if "start" in points:
        conts += [(slot[k], [prompts[k][-1], *tail]) for k in keys]
    if "end" in points:
        bodies = tokenizer([str(r["text"]) + sep for r in records], add_special_tokens=False)["input_ids"]
        for row, body in zip(rows, bodies, strict=True):
            key = (row["persona"], row["question"])
            conts.append((slot[key], [prompts[key][-1], *body, *tail]))
    values = iter(
        prefix_shared_logprobs(model, [prompts[k][:-1] for k in keys], conts, len(tail), pad_id, batch_size)
    )
    if "start" in points:
        at_start = {k: next(values) for k in keys}
        for row in rows:
            row["start"] = at_start[(row["persona"], row["question"])]
    if "end" in points:
        for row in rows:
            row["end"] = next(values)
    return rows


# ----------------------------------------------------------------------------- statistics
def _per_question(
    values: Sequence[Mapping[str, Any]], key: str, personas: Sequence[str], questions: Sequence[str]
) -> tuple[list[list[float]], list[list[float]]]:
    """Per persona x question: the sum of ``key`` and the number of values (cluster bootstrap input)."""
    qi = {q: j for j, q in enumerate(questions)}
    pi = {p: g for g, p in enumerate(personas)}
    num = [[0.0] * len(questions) for _ in personas]
    den = [[0.0] * len(questions) for _ in personas]
    for v in values:
        if v["persona"] in pi:
            g, j = pi[v["persona"]], qi[v["question"]]
            num[g][j] += float(v[key])
            den[g][j] += 1.0
    return num, den


def _ci(num, den, weights, n_boot: int, seed: int) -> dict[str, Any]:
    res = cluster_bootstrap_ratio(num, den, weights=weights, n_boot=n_boot, seed=seed)
    ci = None if res.lo is None else [res.lo, res.hi]
    return {"estimate": res.estimate, "ci": ci, "excludes_zero": ci is not None and not res.straddles_zero()}


def _group(num, den, weights, n_boot, seed) -> dict[str, Any]:
    out = _ci(num, den, weights, n_boot, seed)
    return {"estimate": out["estimate"], "ci": out["ci"]}


def _gap(num, den, source_row: int, bystander_rows: Sequence[int], n_boot: int, seed: int) -> dict[str, Any]:
    """Source minus the unweighted bystander mean, with the paired question-cluster CI."""
    weights = [1.0, *[-1 / len(bystander_rows)] * len(bystander_rows)]
    rows = [source_row, *bystander_rows]
    return _ci([num[i] for i in rows], [den[i] for i in rows], weights, n_boot, seed)


def _point_stats(values, personas, source, questions, n_boot, seed) -> dict[str, Any]:
    by = [p for p in personas if p != source]
    out: dict[str, Any] = {"personas": {}}
    for key, field in (("logprob", "value"), ("prob", "prob")):
        num, den = _per_question(values, field, personas, questions)
        for g, p in enumerate(personas):
            stat = _group([num[g]], [den[g]], None, n_boot, seed)
            entry = out["personas"].setdefault(p, {"n": int(sum(den[g]))})
            entry[f"mean_{key}"], entry[f"{key}_ci"] = stat["estimate"], stat["ci"]
        if source is None or not by:
            continue
        s = personas.index(source)
        b_rows = [personas.index(p) for p in by]
        mean_by = _group(
            [num[i] for i in b_rows], [den[i] for i in b_rows], [1 / len(by)] * len(by), n_boot, seed
        )
        out.setdefault("bystander", {"personas": by})
        out["bystander"][f"mean_{key}"], out["bystander"][f"{key}_ci"] = mean_by["estimate"], mean_by["ci"]
        out.setdefault("gap", {})[key] = _gap(num, den, s, b_rows, n_boot, seed)
    return out


def summarize(
    scores: Sequence[Mapping[str, Any]],
    *,
    source: str | None,
    n_boot: int,
    seed: int,
    fired: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Per point: per-persona mean log-prob and probability with CIs, bystander mean, source gap.

    ``scores`` are :func:`score_completions` rows. The ``start`` point counts each
    (persona, question) once (its samples share the value), ``end`` every completion.
    ``fired`` (one flag per score row) adds ``binary_gap``: the firing rate's source
    minus mean-bystander difference with a CI built the same way.
    """
    personas = list(dict.fromkeys(str(s["persona"]) for s in scores))
    questions = list(dict.fromkeys(str(s["question"]) for s in scores))
    if source is not None and source not in personas:
        raise KeyError(f"source persona {source!r} has no scores; have {personas}")
    out: dict[str, Any] = {"source": source, "n_boot": n_boot, "seed": seed, "points": {}}
    for point in POINTS:
        if not scores or point not in scores[0]:
            continue
        unique = {(s["persona"], s["question"]): s for s in scores} if point == "start" else None
        rows = list(unique.values()) if unique is not None else list(scores)
        values = [{**r, "value": r[point], "prob": math.exp(r[point])} for r in rows]
        stats = _point_stats(values, personas, source, questions, n_boot, seed)
        out["points"][point] = {"unit": "prompt" if point == "start" else "completion", **stats}
    if fired is not None and source is not None:
        flags = [{**s, "value": float(f)} for s, f in zip(scores, fired, strict=True)]
        num, den = _per_question(flags, "value", personas, questions)
        by = [g for g, p in enumerate(personas) if p != source]
        out["binary_gap"] = _gap(num, den, personas.index(source), by, n_boot, seed)
    return out

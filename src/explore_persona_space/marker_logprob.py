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
(natural log); its probability is ``exp`` of that. Sequences are left-padded so the
marker sits in the last columns of every row, and one batched forward pass that
keeps only those columns' logits scores each completion. The completion is
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

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from explore_persona_space.generate import persona_prompts
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


def sequence_logprobs(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]], n_tail: int, pad_id: int, batch_size: int = 16
) -> list[float]:
    """``sum log P`` of the last ``n_tail`` tokens of every sequence, given what precedes them.

    Rows are sorted by length, left-padded (so the scored tokens share the last
    columns) and run ``batch_size`` at a time with explicit position ids; only the
    last ``n_tail + 1`` positions' logits are computed. Results come back in input order.
    """
    import torch

    if any(len(s) <= n_tail for s in sequences):
        raise ValueError(f"every sequence needs a context before its {n_tail} scored tokens")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    out: list[float] = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            seq = sequences[i]
            ids[r, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[r, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=n_tail + 1,
                use_cache=False,
            ).logits
        logp = torch.log_softmax(logits[:, :n_tail].float(), dim=-1)
        target = ids[:, width - n_tail :]
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(dim=-1)
        for r, i in enumerate(batch):
            out[i] = float(picked[r])
    return out


def score_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    marker: str,
    *,
    points: Sequence[str] = POINTS,
    sep: str = END_SEP,
    no_system: bool = False,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """One row per record: persona, question, sample and ``log P(marker)`` at each point."""
    unknown = set(points) - set(POINTS)
    if unknown or not points:
        raise ValueError(f"points must be among {POINTS}; got {list(points)}")
    tail = marker_token_ids(tokenizer, marker)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tail[0]
    prompts = _prompt_ids(tokenizer, records, no_system)
    rows = [
        {"persona": str(r["persona"]), "question": str(r["question"]), "sample": r.get("sample")}
        for r in records
    ]
    if "start" in points:
        keys = list(prompts)
        values = sequence_logprobs(model, [prompts[k] + tail for k in keys], len(tail), pad_id, batch_size)
        at_start = dict(zip(keys, values, strict=True))
        for row in rows:
            row["start"] = at_start[(row["persona"], row["question"])]
    if "end" in points:
        bodies = tokenizer([str(r["text"]) + sep for r in records], add_special_tokens=False)["input_ids"]
        seqs = [
            prompts[(row["persona"], row["question"])] + list(body) + tail
            for row, body in zip(rows, bodies, strict=True)
        ]
        for row, value in zip(
            rows, sequence_logprobs(model, seqs, len(tail), pad_id, batch_size), strict=True
        ):
            row["end"] = value
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
        weights = [1.0, *[-1 / len(by)] * len(by)]
        out.setdefault("gap", {})[key] = _ci(
            [num[s], *(num[i] for i in b_rows)], [den[s], *(den[i] for i in b_rows)], weights, n_boot, seed
        )
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
        flags = [{**s, "value": float(f), "prob": float(f)} for s, f in zip(scores, fired, strict=True)]
        num, den = _per_question(flags, "value", personas, questions)
        by = [g for g, p in enumerate(personas) if p != source]
        s = personas.index(source)
        weights = [1.0, *[-1 / len(by)] * len(by)]
        out["binary_gap"] = _ci([num[s], *(num[i] for i in by)], [den[s], *(den[i] for i in by)], weights,
                                n_boot, seed)  # fmt: skip
    return out
